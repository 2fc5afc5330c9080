"""``python -m unlock_fast.cli``: the same as ``unlock-fast``."""

from __future__ import annotations

import sys

from . import main

sys.exit(main())
