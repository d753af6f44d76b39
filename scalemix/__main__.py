import sys

from scalemix.cli import main

sys.exit(main())
