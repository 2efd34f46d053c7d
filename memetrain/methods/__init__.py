"""Training objectives, one module and one class each, registered by name.

Adding a method means one file here (a :class:`Method` subclass decorated with ``@register``)
and one config in ``configs/method/``; every module in this package is imported on start-up.
"""

import importlib
import pkgutil

from memetrain.methods.base import Method, Stage
from memetrain.methods.registry import METHODS, DataInfo, build_method, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "DataInfo", "Method", "Stage", "build_method", "register"]
