"""Call a constructor with a config's options, reporting unknown or missing ones by name."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from memetrain.errors import ConfigError


def call_with_options(factory: Callable, options: dict[str, Any], what: str) -> Any:
    """``factory(**options)``, with unknown or missing options reported as a :class:`ConfigError`."""
    params = {
        name: p
        for name, p in inspect.signature(factory).parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    unknown = sorted(set(options) - set(params))
    missing = [name for name, p in params.items() if p.default is p.empty and name not in options]
    if unknown or missing:
        problem = f"unknown option(s) {unknown}" if unknown else f"missing option(s) {missing}"
        raise ConfigError(f"{what}: {problem}; it accepts {', '.join(params)}")
    return factory(**options)
