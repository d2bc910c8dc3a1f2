"""``python -m ucat``: the same as the ``ucat`` console script."""

import sys

from ucat._cli import main

if __name__ == "__main__":
    sys.exit(main())
