#!/usr/bin/env python
"""tacnas command line (also installed as the ``tacnas`` command): see ``tacnas/cli.py``."""

import sys

from tacnas.cli import main

if __name__ == "__main__":
    sys.exit(main())
