"""``python -m quadllm.cli``."""

import sys

from .main import main

sys.exit(main())
