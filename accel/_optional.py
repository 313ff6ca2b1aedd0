"""Optional dependencies: one clear message naming the extra to install.

``require("matplotlib", extra="plot", feature="plot_control_chart")`` returns the module, or raises
:class:`MissingDependency` (an ``ImportError``) whose message is one line: what needs it and the pip command
that installs it. The CLI prints that line and exits 2 instead of showing a traceback.
"""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingDependency", "require"]

DISTRIBUTION = "accel-train"


class MissingDependency(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str, *, extra: str, feature: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependency` naming ``pip install 'accel-train[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        if error.name is not None and error.name.split(".")[0] != module.split(".")[0]:
            raise  # the module is there but one of its own imports failed: that is not a missing extra
        raise MissingDependency(
            f"{feature} needs {module.split('.')[0]}, which is not installed: "
            f"pip install '{DISTRIBUTION}[{extra}]'",
            name=module,
        ) from None
