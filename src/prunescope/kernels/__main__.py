"""``python -m prunescope.kernels``: build (or find) the fast kernels and say which will run."""

import sys

from prunescope.kernels.build import main

sys.exit(main())
