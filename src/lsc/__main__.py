"""``python -m lsc``: the same as the ``lsc`` console script."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
