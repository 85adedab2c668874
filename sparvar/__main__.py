"""`python -m sparvar ...` (also what torchrun runs)."""

import sys

from sparvar.cli import main

sys.exit(main())
