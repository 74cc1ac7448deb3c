"""Names a package exports without importing their (heavy) modules until first use.

``fedpriv`` and ``fedpriv.privacy`` export torch-based classes (``TorchClient``,
``LocalDP``) but must import without torch: the coordinator never needs it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: dict[str, Any], names: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A module ``__getattr__`` and ``__dir__`` that import each of `names` from its module.

    Args:
        package: The package's ``globals()``; a name, once imported, is cached there.
        names: Exported name -> the module that defines it.

    Example:
        >>> namespace = {"__name__": "demo"}
        >>> getattr_, dir_ = lazy_exports(namespace, {"sqrt": "math"})
        >>> getattr_("sqrt")(9.0), "sqrt" in namespace, "sqrt" in dir_()
        (3.0, True, True)
    """

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package['__name__']!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        package[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*package, *names})

    return __getattr__, __dir__
