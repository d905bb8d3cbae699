"""The frame every launcher in scripts/ shares around its work."""

import sys

from absl import app, flags, logging


def run(main):
    """`app.run` a function of no arguments: stray arguments are refused, Orbax's per-save INFO
    logs are hidden unless --verbosity is given, and a ValueError (bad input) becomes one
    `error:` line on stderr and exit status 2."""
    def absl_main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}")
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        try:
            main()
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    app.run(absl_main)
