"""``python -m edge_lstm``: the ``edge-lstm`` command."""

import sys

from edge_lstm.cli import main

if __name__ == "__main__":
    sys.exit(main())
