import sys

from poolq.commands.cli import main

sys.exit(main())
