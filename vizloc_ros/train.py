"""`vizloc-train`: Train a pose regressor. Not implemented yet."""
import sys

from vizloc_ros.cli_common import not_built_yet


def main(argv=None) -> int:
    return not_built_yet("vizloc-train", "Train a pose regressor", argv)


if __name__ == "__main__":
    sys.exit(main())
