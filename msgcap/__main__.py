"""``python -m msgcap``: the same as the ``msgcap`` command."""

import sys

from msgcap.cli import main

sys.exit(main())
