"""`python -m tinykern.pipelines.rqvae ...`: the same commands as `tinykern rqvae ...`."""

import argparse
import sys

from tinykern.pipelines.rqvae.cli import add_parser, run


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tinykern.pipelines.rqvae")
    commands = parser.add_subparsers(dest="command", required=True)
    add_parser(commands)
    run(parser.parse_args(["rqvae", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    main()
