"""``python -m sites validate PATH`` / ``python -m sites build --all OUT_DIR`` (same as ``oncofed sites``)."""

import sys

from sites.cli import main

sys.exit(main())
