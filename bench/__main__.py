"""`python -m bench`: the same as `raftq bench`."""

import sys

from bench.main import main

sys.exit(main())
