"""The frame every launcher in scripts/ shares around its work."""

import signal
import sys

from absl import app, flags, logging


def run(main):
    """`app.run` a function of no arguments: a bad flag or stray argument is refused, Orbax's per-save INFO
    logs are hidden unless --verbosity is given, a ValueError (bad input) becomes one
    `error:` line on stderr and exit status 2, and a training run stopped by SIGTERM
    (`train.Preempted`, after saving) one `preempted:` line and exit status 143, the status of a
    process that SIGTERM ends, so that schedulers and retry loops treat the run as unfinished."""
    def absl_main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}")
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        from ptune.train import Preempted
        try:
            main()
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except Preempted as e:
            print(f"preempted: {e}", file=sys.stderr)
            sys.exit(128 + signal.SIGTERM)
    app.run(absl_main, flags_parser=_parse_flags)


def _parse_flags(argv):
    """absl's flag parsing, with a bad flag or a --config.<key> override naming no key as one
    `error:` line and exit status 2 (absl prints two lines and exits 1; ml_collections a traceback)."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError) as e:   # ml_collections: --config.<key> naming no key
        while e.args and isinstance(e.args[0], Exception):   # ml_collections wraps a KeyError
            e = e.args[0]
        text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {' '.join(str(text).split())}; see --helpshort", file=sys.stderr)
        sys.exit(2)
