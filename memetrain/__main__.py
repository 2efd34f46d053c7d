"""``python -m memetrain <program> [overrides]``: every launcher without the repository's launcher/
folder (a wheel has none; a sweep's jobs start their trainings this way)."""

from __future__ import annotations

import sys

PROGRAMS = ("train", "sweep", "pack", "collect", "predict", "export", "fetch_weights", "inspect_shards")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1].replace("-", "_") not in PROGRAMS:
        print(f"usage: python -m memetrain {{{','.join(PROGRAMS)}}} [key=value ...]", file=sys.stderr)
        sys.exit(2)
    program = sys.argv.pop(1).replace("-", "_")
    from memetrain import cli

    getattr(cli, program)()


if __name__ == "__main__":
    main()
