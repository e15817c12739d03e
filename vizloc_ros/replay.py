"""`vizloc-replay`: Replay a rosbag2 through the relocalization pipeline. Not implemented yet."""
import sys

from vizloc_ros.cli_common import not_built_yet


def main(argv=None) -> int:
    return not_built_yet("vizloc-replay", "Replay a rosbag2 through the relocalization pipeline", argv)


if __name__ == "__main__":
    sys.exit(main())
