"""`python -m app.cli`: the `baerase` command (how `serve --embedded` starts its worker)."""

import sys

from app.cli import main

sys.exit(main())
