import sys

from latentflow_fast.cli import main

sys.exit(main())
