"""Run pyreg's benchmark suite: ``python bench/run.py [--quick] ...`` (same as ``pyreg bench``).

From a source checkout: the checkout's pyreg is used when it holds the compiled
module (an in-place build); otherwise an installed pyreg (``pip install .``),
so that the compiled kernels are timed, not the float64 specification that an
uncompiled checkout falls back to."""
import glob
import importlib.util
import os
import sys

_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if glob.glob(os.path.join(_root, "pyreg", "_C.*")) or importlib.util.find_spec("pyreg") is None:
    sys.path.insert(0, _root)

from pyreg.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
