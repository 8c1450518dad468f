"""Lazy public names for a package's `__init__`: `import megatron_lcl.data` stays cheap, and each
name imports its module on first use."""

import importlib
from typing import Callable, Dict


def lazy_getattr(package: str, exports: Dict[str, str]) -> Callable[[str], object]:
    """A module-level `__getattr__` resolving `name` to `package.<exports[name]>.name`."""

    def __getattr__(name: str):
        if name in exports:
            return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
