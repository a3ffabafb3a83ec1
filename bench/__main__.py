"""`python -m raftq.bench`: the same as `raftq bench`."""

import sys

from raftq.bench.main import main

sys.exit(main())
