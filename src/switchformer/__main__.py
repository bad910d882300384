"""``python -m switchformer``: the ``switchformer`` command (see :mod:`switchformer.cli`)."""

import sys

from switchformer.cli import main

sys.exit(main())
