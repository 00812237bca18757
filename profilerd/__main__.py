import sys

from profilerd.cli import main

sys.exit(main())
