"""`python -m raftq`: the same as the `raftq` command."""

import sys

from raftq.command import main

sys.exit(main())
