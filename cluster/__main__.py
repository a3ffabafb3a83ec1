import sys

from cluster.main import main

sys.exit(main())
