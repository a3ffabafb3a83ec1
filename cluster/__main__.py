import sys

from raftq.cluster.main import main

sys.exit(main())
