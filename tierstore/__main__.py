"""``python -m tierstore`` is the ``tierstore`` command."""

import sys

from .cli import main

sys.exit(main())
