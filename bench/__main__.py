"""`python -m bench`: see bench/__init__.py and bench/README.md."""

import sys

from bench.cli import main

sys.exit(main())
