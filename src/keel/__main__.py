"""`python -m keel ...`, which is also how `accelerate launch -m keel train ...` starts training processes."""

import sys

from keel.cli.main import main

sys.exit(main())
