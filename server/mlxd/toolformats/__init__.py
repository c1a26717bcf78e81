"""Tool-call formats, one module each; importing this package registers every one of them.

Each module in this package other than ``base`` defines one :class:`ToolCallFormat` and passes
it to :func:`register`, so adding a model family's format is adding one module here (README,
"Adding a tool-call format").
"""

import importlib
import pkgutil

from mlxd.toolformats.base import (
    FALLBACK,
    PROBE_NAME,
    ToolCallFormat,
    Tools,
    format_for,
    get,
    names,
    probe,
    register,
)

__all__ = [
    "FALLBACK",
    "PROBE_NAME",
    "ToolCallFormat",
    "Tools",
    "format_for",
    "get",
    "names",
    "probe",
    "register",
]

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
