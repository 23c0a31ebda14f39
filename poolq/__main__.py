import sys

from poolq.cli import main

sys.exit(main())
