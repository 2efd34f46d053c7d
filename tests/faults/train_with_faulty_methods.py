"""``launcher/train.py`` with the test-only methods of ``faulty_methods.py`` registered.

Run as a script by the fault tests (a real process through the real entry point); the repository
root goes on ``sys.path`` so that ``tests`` imports without an installed package.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import tests.faults.faulty_methods  # noqa: E402, F401  (registers method.name=faulty_supervised)
from memetrain.cli import train  # noqa: E402

if __name__ == "__main__":
    train()
