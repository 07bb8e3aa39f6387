"""``python -m distillery`` (also what ``torchrun -m distillery`` runs)."""

import sys

from distillery.cli import main

sys.exit(main())
