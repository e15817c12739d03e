"""`vizloc-synth`: synthetic indoor world. Not implemented yet."""
import sys

from vizloc_ros.cli_common import not_built_yet


def main(argv=None) -> int:
    return not_built_yet("vizloc-synth", "Render the synthetic world into a rosbag2", argv)


if __name__ == "__main__":
    sys.exit(main())
