"""``python -m lowvram``: the ``lowvram`` command."""

import sys

from .cli import main

sys.exit(main())
