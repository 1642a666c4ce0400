"""The tinykern command line: `python -m tinykern info|demo|sd|rqvae`."""

import argparse


def main(argv=None):
    parser = argparse.ArgumentParser(prog="tinykern", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, built and usable backends, build flags")
    demo = commands.add_parser("demo", help="quantize an SD1.5-shaped layer stack and print what it saves")
    demo.add_argument("--device", default="cpu")
    from tinykern.pipelines import cli_checks as checks
    from tinykern.pipelines.rqvae import cli as rqvae_cli  # these import no heavy dependency
    from tinykern.pipelines.sd.cli import add_parser as add_sd_parser

    add_sd_parser(commands)
    rqvae_cli.add_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "info":
        from tinykern.info import report

        print(report())
    elif args.command == "demo":
        from tinykern.demo import run

        with checks.one_line_errors("tinykern demo"):
            checks.device("--device", args.device)
        run(args.device)
    elif args.command == "rqvae":
        rqvae_cli.run(args)
    else:
        args.func(args)


if __name__ == "__main__":
    main()
