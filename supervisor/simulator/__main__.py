"""``python -m supervisor.simulator``: same as ``neuron-fleet simulate-replica``."""

import argparse
import sys

from supervisor.simulator import cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m supervisor.simulator",
        description="Run one simulated TGI Neuron replica.",
    )
    cli.add_arguments(parser)
    return cli.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
