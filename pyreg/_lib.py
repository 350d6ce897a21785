"""Loads the compiled module pyreg._C, if it was built and imports."""
from __future__ import annotations

try:
    from . import _C  # type: ignore[attr-defined]

    LOAD_ERROR: str | None = None
except ImportError as e:  # e.g. running from a source tree that was never built
    _C = None
    LOAD_ERROR = f"{type(e).__name__}: {e}"
    if "partially initialized" in str(e) or "cannot import name '_C'" in str(e):
        LOAD_ERROR += (" -- this is pyreg's source tree, which has no compiled module; "
                       "run from another directory after `pip install .`, or use `pip install -e .`")
