"""``python -m nn train ...`` (see :mod:`nn.cli`)."""

import sys

from nn.cli import main

sys.exit(main())
