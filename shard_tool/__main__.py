import sys

from shard_tool.cli import main

sys.exit(main())
