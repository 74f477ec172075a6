"""`python -m fastmedusa ...` (what torchrun and accelerate launch with `-m fastmedusa`)."""

import sys

from fastmedusa.cli import main

sys.exit(main())
