import sys

from minift.cli import main

sys.exit(main())
