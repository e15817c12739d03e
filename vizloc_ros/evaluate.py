"""`vizloc-eval`: Evaluate a checkpoint on a dataset split. Not implemented yet."""
import sys

from vizloc_ros.cli_common import not_built_yet


def main(argv=None) -> int:
    return not_built_yet("vizloc-eval", "Evaluate a checkpoint on a dataset split", argv)


if __name__ == "__main__":
    sys.exit(main())
