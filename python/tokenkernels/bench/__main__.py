"""``python -m tokenkernels.bench``: see :mod:`tokenkernels.bench`."""
import sys

from . import main

sys.exit(main())
