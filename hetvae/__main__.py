"""``python -m hetvae``: the ``hetvae`` command, for environments whose scripts folder is not on
``PATH`` (or to pick the interpreter explicitly)."""

import sys

from hetvae.cli import main

if __name__ == "__main__":
    sys.exit(main())
