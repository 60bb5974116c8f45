"""``python -m sdlm``: the command line (also what ``torchrun -m sdlm train ...`` runs)."""

import sys

from .cli import main

sys.exit(main())
