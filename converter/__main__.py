"""``python -m converter`` runs ``edge-lstm-convert``."""

import sys

from converter.cli import main

sys.exit(main())
