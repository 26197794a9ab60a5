"""`python -m angle_rt.embed BUNDLE INPUT OUTPUT [flags]` (the same as `angle-rt embed`)."""

import sys

from angle_rt.embed.cli import main

sys.exit(main())
