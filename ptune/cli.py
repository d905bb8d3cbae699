"""The frame every launcher in scripts/ shares around its work."""

import os
import re
import signal
import sys
import warnings

from absl import app, flags, logging
from ml_collections.config_flags import config_flags

from ptune.errors import UserError

# XLA:CPU's default, concurrency-optimised scheduler runs the backward pass's independent ops side
# by side by keeping every layer's forward activations alive at once: it undoes `model.remat` and
# holds 8-24% more step memory for no measured speed (BUILD_NOTES, issue 8). XLA reads this flag
# from XLA_FLAGS only (a per-jit compiler option is ignored), when its first backend starts.
# Accelerator backends ignore it.
SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler"


def set_xla_flags():
    """Switch XLA:CPU's memory-hungry scheduler off in XLA_FLAGS, unless the user chose it there; the
    launchers call this before JAX starts (`import ptune` changes no environment variable: call it
    first thing in your own programs to get the same step memory as the launchers)."""
    flags_now = os.environ.get("XLA_FLAGS", "")
    if SCHEDULER in flags_now:
        return
    os.environ["XLA_FLAGS"] = f"{flags_now} {SCHEDULER}=false".strip()
    from jax._src import xla_bridge
    if getattr(xla_bridge, "backends_are_initialized", lambda: False)():
        warnings.warn(f"JAX's backends started before ptune.cli.set_xla_flags(), so XLA:CPU keeps its "
                      f"memory-hungry scheduler (model.remat has no effect on CPU): call it first, or set "
                      f"XLA_FLAGS='{SCHEDULER}=false'", stacklevel=2)


def run(main):
    """`app.run` a function of no arguments, after `set_xla_flags`: a bad flag or stray argument is
    refused, Orbax's per-save INFO logs are hidden unless --verbosity is given, a `UserError` (bad input)
    becomes one `error:` line on stderr and exit status 2 (any other exception is a bug and keeps its
    traceback), and a training run stopped by SIGTERM or Ctrl-C
    (`train.Preempted`, after saving) one `preempted:` line and exit status 143 or 130, the status
    of a process that signal ends, so that schedulers and retry loops treat the run as unfinished."""
    def absl_main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}")
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        from ptune.training.train import Preempted
        try:
            main()
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except Preempted as e:
            print(f"preempted: {e}", file=sys.stderr)
            sys.exit(128 + e.signum)
        except KeyboardInterrupt:   # Ctrl-C outside the training loop (which saves first: Preempted)
            print("interrupted: stopped by Ctrl-C (SIGINT) before training or after its last save; rerun the "
                  "same command to resume", file=sys.stderr)
            sys.exit(128 + signal.SIGINT)
    set_xla_flags()
    app.run(absl_main, flags_parser=_parse_flags)


def _parse_flags(argv):
    """absl's flag parsing, with a bad flag or a --config.<key> override naming no key as one
    `error:` line and exit status 2 (absl prints two lines and exits 1; ml_collections a traceback)."""
    try:
        return flags.FLAGS(argv)
    except ConfigFileError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (flags.Error, AttributeError, KeyError) as e:   # ml_collections: --config.<key> naming no key
        while e.args and isinstance(e.args[0], Exception):   # ml_collections wraps a KeyError
            e = e.args[0]
        text = " ".join(str(e.args[0] if isinstance(e, KeyError) and e.args else e).split())
        key = re.match(r"'([^']+)'", text) if isinstance(e, KeyError) else None
        flag = key and next((a.split("=")[0] for a in argv[1:]
                             if re.match(rf"--?config\.(\S+\.)?{re.escape(key[1])}([.=]|$)", a)), None)
        print(f"error: {flag + ' names no config key: ' if flag else ''}{text}; see --helpshort", file=sys.stderr)
        sys.exit(2)


class ConfigFileError(Exception):
    """A config file that does not load (not a UserError: absl would bury it in a longer message)."""


class _ConfigFile(flags.ArgumentParser):
    """--config=file.py[:arg] loaded by ptune.config.load (one line naming file:line on failure; the
    file's folder importable; the user's modules it imports recorded). So that every override finds
    its key, a method or task named by --config.method.name / --config.task.name comes with its
    options at their defaults, and each --config.optim.groups.<label>.* override opens that group."""

    def __init__(self, lock_config: bool):
        self.lock_config = lock_config

    def flag_type(self):
        return "config object"

    def parse(self, spec):
        from ptune import config as config_lib
        argv = "\n".join(sys.argv)
        chosen = dict(re.findall(r"^--?config\.(method|task)\.name=(.*)$", argv, re.M))
        try:
            config = config_lib.load(spec)
            if chosen.get("method", config.method.name) != config.method.name:
                config = config_lib.with_method(config, chosen["method"])
            if chosen.get("task", config.task.name) != config.task.name:
                config = config_lib.with_task(config, chosen["task"])
        except UserError as e:
            raise ConfigFileError(e) from None
        config_lib.open_groups(config, re.findall(r"^--?config\.optim\.groups\.([^.=]+)\.", argv, re.M))
        if self.lock_config:
            config.lock()
        return config


def define_config_flag(help_string: str, lock_config: bool = True):
    """The --config flag (see `_ConfigFile`), with ml_collections' --config.<key>=value overrides."""
    # ml_collections' DEFINE_config_file takes no parser, so its flag class is built directly.
    flag = config_flags._ConfigFlag(parser=_ConfigFile(lock_config), serializer=flags.ArgumentSerializer(),
                                    name="config", default=None, help_string=help_string)
    return flags.DEFINE_flag(flag)
