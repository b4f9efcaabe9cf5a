"""`python bench/run.py` is `python -m bench` (kept for older docs)."""

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the checkout, not bench/: `import bench` is the package
from bench.cli import main  # noqa: E402

sys.exit(main())
