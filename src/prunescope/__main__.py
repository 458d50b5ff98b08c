"""``python -m prunescope`` is the ``prunescope`` command."""

import sys

from prunescope.cli import main

sys.exit(main())
