"""`basestation`: lands with issue 4 (generate, chat, status)."""

import sys


def main(argv=None) -> int:
    print("basestation: not built yet (issue 4); see README", file=sys.stderr)
    return 2
