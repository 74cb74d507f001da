import sys

from basestation.cli import main

sys.exit(main())
