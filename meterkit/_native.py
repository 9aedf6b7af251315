"""The optional compiled part of meterkit, if it was built.

``meterkit/_speedups.c`` holds the memory backend's steady-state check (see
:class:`meterkit.MemoryBackend`) and the charge-id counter. Installing from source
compiles it when a C compiler is at hand (``hatch_build.py``); without one, meterkit
is the same library in pure Python, only slower. ``METERKIT_PURE_PYTHON=1`` in the
environment ignores a built extension (to compare, or to rule it out).
"""

from __future__ import annotations

import os
from types import ModuleType

__all__ = ["speedups"]


def _load() -> ModuleType | None:
    if os.environ.get("METERKIT_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        from meterkit import _speedups
    except ImportError:
        return None
    return _speedups


#: The compiled module, or None when meterkit runs in pure Python.
speedups: ModuleType | None = _load()
