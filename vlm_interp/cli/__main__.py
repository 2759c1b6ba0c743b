"""``python -m vlm_interp.cli`` (and ``accelerate launch -m vlm_interp.cli``) runs the command line."""

import sys

from . import main

sys.exit(main())
