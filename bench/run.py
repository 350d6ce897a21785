"""Run pyreg's benchmark suite: ``python bench/run.py [--quick] ...`` (same as ``pyreg bench``)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyreg.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
