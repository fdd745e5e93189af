"""``python -m pyro_wakesleep`` is the ``pyro-wakesleep`` command."""

import sys

from .cli import main

sys.exit(main())
