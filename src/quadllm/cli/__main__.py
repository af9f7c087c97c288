"""``python -m quadllm.cli``."""

import sys

from .app import main

sys.exit(main())
