"""Small helpers shared by the command-line entry points."""
from __future__ import annotations

import argparse
import sys


def not_built_yet(prog: str, description: str, argv=None) -> int:
    """Entry point of a CLI whose feature is not implemented yet.

    ``--help`` works and says so; any other call prints the same on stderr and exits 2,
    so no script can mistake it for a result.
    """
    parser = argparse.ArgumentParser(
        prog=prog, description=f"{description} (NOT IMPLEMENTED YET in this version)")
    parser.parse_known_args(argv)
    print(f"{prog}: this command is not implemented yet in vizloc_ros "
          f"{__import__('vizloc_ros').__version__}.", file=sys.stderr)
    return 2
