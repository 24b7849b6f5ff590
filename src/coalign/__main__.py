"""`python -m coalign ...` (and `torchrun -m coalign ...`): the same command line as `coalign`."""

import sys

from coalign.cli import main

sys.exit(main())
