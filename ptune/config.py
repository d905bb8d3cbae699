"""The config schema: every knob with its default. Experiment files start from
`base_config()` and change what they need; `check(config)` rejects keys that do not exist and
values out of range. `load("file.py:arg")` loads an experiment file as every door (launchers,
sweeps, the Python API) does; `override(config, {"dotted.key": value})` applies overrides."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import inspect
import math
import os
import re
import site
import sys
import sysconfig
import traceback

import ml_collections
from ml_collections import config_dict

from ptune import methods, sharding
from ptune.errors import UserError
from ptune.models.model_config import ModelConfig
from ptune.optim import Group
from ptune.training import evals


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # The user's Python files the config file imported ("module=path", recorded by `load`): every
    # place that rebuilds a run (setup, export, serve, sweeps) imports them first, so that a custom
    # method or task they register exists there too.
    c.imports = ()
    # model.checkpoint: an asset name, HF directory or .gguf file with pretrained weights; without
    # one, model.preset names a random-init shape in ptune.models.model_config.PRESETS. Any ModelConfig
    # field given beside them overrides the shape. The precision and memory knobs are listed so
    # that command-line overrides find them: dtype (compute), frozen_dtype (storage of frozen
    # leaves), remat (per-block rematerialisation; see ptune.models.model_config.REMAT).
    c.model = ml_collections.ConfigDict({"preset": "gpt2-tiny", "checkpoint": "", "dtype": "float32",
                                         "frozen_dtype": "float32", "remat": "none"})
    # method.name is a registered method or 'a+b'; its options sit beside it (or under method.<part>).
    c.method = ml_collections.ConfigDict({"name": "lora"})
    c.task = ml_collections.ConfigDict(dict(
        name="synthetic_sentiment",
        options=ml_collections.ConfigDict(),   # passed to the task builder
        objective="auto",                      # auto | lm | verbalizer | head
        max_length=64,
        template_index=0,                      # which of the task's paraphrased templates
        template="",                           # a custom template text ('' = the indexed one)
        verbalizer=(),                         # custom label words, one per class (() = the template's)
        packing=False,                         # lm/generate/chat: several examples per row (ptune.data.packing)
    ))
    c.optim = ml_collections.ConfigDict({f.name: f.default for f in dataclasses.fields(Group)})
    c.optim.clip_norm = 1.0
    c.optim.groups = ml_collections.ConfigDict()  # label -> overrides of the fields above (None: inherit)
    c.train = ml_collections.ConfigDict(dict(
        steps=100, batch_size=16, eval_batch_size=64, eval_every=50, log_every=10,
        eval_split="validation", progress=True,
        grad_accum=1,                          # micro-batches per step (equal to the whole batch at once)
        nonfinite="stop",                      # a step with a non-finite loss/gradient: stop | skip (never applied)
        # Early stopping: stop after this many evaluations without a better checkpoint.best_metric and
        # end on the best evaluation's parameters (ptune.training.stopping); 0 trains all the steps.
        patience=0,
    ))
    # Devices as a (data, fsdp, tensor) mesh; -1 = the rest. rules: logical parameter axis -> mesh
    # axes ("" replicates). Method sites are replicated unless their path matches shard_sites.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, shard_sites="",
                                            rules=ml_collections.ConfigDict(sharding.DEFAULT_RULES)))
    # Adapter-only checkpoints in <workdir>/checkpoints (ptune.training.checkpoint); a run restarted on
    # the same workdir resumes from the newest one.
    c.checkpoint = ml_collections.ConfigDict(dict(
        every_steps=100,            # save every N steps and after the last step; 0: no checkpoints
        keep=2,                     # keep the newest N
        keep_best=0,                # also keep the best N by the eval best_metric (each save then evaluates)
        best_metric="loss",         # loss | accuracy (classification) | perplexity (lm)
        best_mode="min",            # min | max
        allow_base_mismatch=False,  # resume even if the frozen base's sha256 differs from the checkpoint's
    ))
    # The final evaluation suite, run once after training (see ptune.training.evals).
    c.eval = ml_collections.ConfigDict(evals.DEFAULTS)
    return c


def with_method(config: ml_collections.ConfigDict, name: str, **options) -> ml_collections.ConfigDict:
    """Set config.method to `name` with every option it accepts at its default (so that
    command-line overrides such as --config.method.rank=16 find their key)."""
    def defaults(part):
        if part not in methods.REGISTRY:
            raise UserError(f"unknown method {part!r}; choose one of {sorted(methods.REGISTRY)}")
        params = list(inspect.signature(methods.REGISTRY[part]).parameters.values())[1:]
        # A None default becomes a typed placeholder so --config.method.<option>=... can set it.
        return {p.name: _placeholder(p) if p.default is None else p.default for p in params}

    parts = name.split("+")
    if len(parts) == 1:
        body = {**defaults(name), **options}
    else:
        body = {p: {**defaults(p), **options.get(p, {})} for p in parts}
    config.method = ml_collections.ConfigDict({"name": name, **body}, type_safe=False)
    return config


def _placeholder(parameter: inspect.Parameter):
    """A config placeholder typed by a builder's parameter annotation (`int | None` -> int, else str)."""
    return config_dict.placeholder(int if "int" in str(parameter.annotation) else str)


def with_task(config: ml_collections.ConfigDict, name: str, **options) -> ml_collections.ConfigDict:
    """Set config.task.name to `name` with every option its builder accepts at its default (so that
    command-line overrides such as --config.task.options.train=data.jsonl find their key)."""
    from ptune.data import tasks
    if name not in tasks.REGISTRY:
        raise UserError(f"unknown task {name!r}; choose one of {sorted(tasks.REGISTRY)}")
    unknown = sorted(set(options) - set(inspect.signature(tasks.REGISTRY[name]).parameters))
    if unknown:
        raise UserError(f"task {name!r} has no option(s) {unknown}")
    defaults = {}
    for p in inspect.signature(tasks.REGISTRY[name]).parameters.values():
        if p.default is None:   # a typed placeholder, so that an override can set it
            defaults[p.name] = _placeholder(p)
        elif p.default is not inspect.Parameter.empty:
            defaults[p.name] = p.default
    config.task.name = name
    config.task.options = ml_collections.ConfigDict({**defaults, **options}, type_safe=False)
    return config


def check(config) -> None:
    """Unknown keys outside the open sections (model, method, task.options, optim.groups, mesh.rules)
    and numeric values out of range: one line naming the key, before anything is built or written."""
    base = base_config()
    for section in ("", "task", "optim", "train", "mesh", "checkpoint", "eval"):
        have = config.get(section) if section else config
        want = base.get(section) if section else base
        unknown = sorted(set(have.keys()) - set(want.keys()))
        if unknown:
            where = f"config.{section}." if section else "config."
            raise UserError(f"unknown config key(s) {[where + k for k in unknown]}; "
                            f"valid: {sorted(want.keys())}")
    fields = {f.name for f in dataclasses.fields(Group)}
    for label, overrides in config.optim.groups.items():
        unknown = sorted(set(overrides.keys()) - fields)
        if unknown:
            raise UserError(f"config.optim.groups.{label} has unknown key(s) {unknown}; valid: {sorted(fields)}")
    for key, least in AT_LEAST.items():
        value = _get(config, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise UserError(f"config.{key}={value!r} must be an integer >= {least}")
    clip = config.optim.clip_norm
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or
                             not (math.isfinite(clip) and clip >= 0)):
        raise UserError(f"config.optim.clip_norm={clip!r} must be a finite number >= 0 (0: no clipping)")
    try:   # the default group; each label's group is checked by builder.optimizer_group
        Group(**{k: v for k, v in config.optim.items() if k not in ("groups", "clip_norm")})
    except (TypeError, ValueError) as e:
        raise UserError(f"config.optim.{e}") from None


# Integer keys and their least value. Optimizer fields are checked by optim.Group, model fields by
# ModelConfig, method options by the method, mesh sizes by sharding.make_mesh.
AT_LEAST = {"seed": 0, "task.max_length": 1, "task.template_index": 0, "train.steps": 1, "train.batch_size": 1,
            "train.eval_batch_size": 1, "train.eval_every": 1, "train.log_every": 1, "train.grad_accum": 1,
            "train.patience": 0,
            "checkpoint.every_steps": 0, "checkpoint.keep": 1, "checkpoint.keep_best": 0,
            "eval.max_examples": 0, "eval.lm_max_length": 2, "eval.lm_max_examples": 0}


def _get(config, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def open_groups(config, labels) -> None:
    """Give each label in `labels` a section in config.optim.groups with every optimizer field present
    and None (= inherited from config.optim and the method's defaults), so that overrides such as
    --config.optim.groups.<label>.learning_rate=0.3 find their key."""
    groups = config.optim.groups
    with groups.unlocked():
        for label in labels:
            if label not in groups:
                groups[label] = ml_collections.ConfigDict(
                    {f.name: config_dict.placeholder(type(f.default)) for f in dataclasses.fields(Group)})


# ------------------------------------------------------------------------------------- overrides

# Sections whose keys are open (checked later by the code that reads them): ModelConfig fields
# beside model.preset, and task options. (An optimizer group an override names is opened first.)
_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}


def override(config, overrides, where: str = "override"):
    """A copy of `config` with dotted `overrides` ({"method.rank": 8}) applied and checked; a key that
    does not exist is an error. The key `method` sets config.method to that method with its options
    at their defaults, before the other keys."""
    config = copy.deepcopy(config)
    if "method" in overrides:
        config = with_method(config, overrides["method"])
    for key, value in overrides.items():
        if key == "method":
            continue
        *parents, leaf = key.split(".")
        if parents[:2] == ["optim", "groups"] and len(parents) == 3:
            open_groups(config, parents[2:])
        node = config
        for depth, part in enumerate(parents):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                _unknown(key, node, ".".join(parents[:depth]), where)
            node = node[part]
        section = ".".join(parents)
        if not isinstance(node, ml_collections.ConfigDict):
            _unknown(key, None, section, where)
        if leaf not in node and not _open(section, leaf):
            _unknown(key, node, section, where)
        try:
            with node.unlocked():
                node[leaf] = value
        except (TypeError, AttributeError) as e:
            raise UserError(f"{where}: cannot set config.{key}={value!r} ({e})") from None
    try:
        check(config)
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None
    return config


def _open(section: str, leaf: str) -> bool:
    return (section == "model" and leaf in _MODEL_FIELDS) or section == "task.options"


def _unknown(key, node, section, where):
    if not isinstance(node, ml_collections.ConfigDict):
        raise UserError(f"{where}: config key {key!r} does not exist; config.{section} is a value, not a section")
    valid = sorted(set(node.keys()) | (_MODEL_FIELDS if section == "model" else set()))
    raise UserError(f"{where}: config key {key!r} does not exist; valid keys under "
                    f"config{'.' + section if section else ''}: {valid}")


# ---------------------------------------------------------------------------------- config files

_PTUNE = os.path.dirname(os.path.abspath(__file__))
_INSTALLED = {os.path.abspath(p) for p in [*site.getsitepackages(), site.getusersitepackages(),
                                           *sysconfig.get_paths().values()]}
_IMPORTED: dict[str, list[str]] = {}   # config file -> the user modules its loads imported


def _user_file(filename: str | None) -> bool:
    """A Python file of the user's: not ptune's, not installed, not the standard library's."""
    if not filename or filename.startswith("<"):
        return False
    path = os.path.abspath(filename)
    return not any(path == d or path.startswith(d + os.sep) for d in (_PTUNE, *_INSTALLED))


def _located(error: BaseException, doing: str) -> str:
    """One line: the user's file:line where `error` arose (a syntax error's own line), and the error."""
    if isinstance(error, SyntaxError) and error.filename:
        return (f"{error.filename}:{error.lineno}: {error.msg}: {(error.text or '').strip()!r}; fix the syntax")
    frames = [f for f in traceback.extract_tb(error.__traceback__) if _user_file(f.filename)]
    where = f"{frames[-1].filename}:{frames[-1].lineno}: " if frames else ""
    fix = (f"; install it, or put {error.name}.py beside the config file"
           if isinstance(error, ModuleNotFoundError) and error.name else "")
    return f"{where}{doing} raised {type(error).__name__}: {' '.join(str(error).split())}{fix}"


def load_module(path: str, name: str | None = None):
    """The Python file `path` as a module, its folder importable from it (as for a script): an error
    while running it is one UserError naming file:line."""
    if not os.path.isfile(path):
        raise UserError(f"config file {path!r} does not exist; give the path of a Python file "
                        "(see experiments/default.py)")
    path = os.path.abspath(path)
    if os.path.dirname(path) not in sys.path:
        sys.path.insert(0, os.path.dirname(path))
    name = name or "ptune_config_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module   # as an import does: what it defines can refer to its module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise UserError(_located(e, f"loading {path}")) from None
    return module


def load(spec: str) -> ml_collections.ConfigDict:
    """`file.py` or `file.py:argument` -> its `get_config(argument)`, as every launcher loads it: the
    file's folder is importable from it, the user's modules it imports are recorded in
    config.imports, and a missing file, syntax error, import error or raising get_config is one
    UserError naming file:line."""
    path, *argument = spec.split(":", 1)
    before = set(sys.modules)
    module = load_module(path)
    if not callable(getattr(module, "get_config", None)):
        raise UserError(f"config file {path!r} defines no get_config(); add one returning a ConfigDict "
                        "(see experiments/default.py)")
    call = f"get_config({', '.join(map(repr, argument))})"
    try:
        config = module.get_config(*argument)
    except Exception as e:
        raise UserError(_located(e, call)) from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise UserError(f"{path}: {call} returned {type(config).__name__}, not a ConfigDict; return "
                        "ptune.config.base_config() with your changes")
    imported = _IMPORTED.setdefault(module.__file__, [])
    for name in [n for n in sys.modules if n not in before and n != module.__name__]:   # in import order
        if _user_file(getattr(sys.modules[name], "__file__", None)):
            imported.append(f"{name}={sys.modules[name].__file__}")
    with config.unlocked():
        config.imports = (*dict.fromkeys(imported), f"{module.__name__}={module.__file__}")
    return config


def import_recorded(config) -> None:
    """Import the user's files that the run's config file imported (config.imports), so that the
    methods and tasks they register exist in this process too (export, serve, a sweep's points)."""
    for entry in config.get("imports", ()):
        name, _, path = entry.partition("=")
        if name in sys.modules:
            continue
        if not os.path.isfile(path):
            raise UserError(f"the run's config file imported {path} (module {name!r}), which does not exist here; "
                            "put it back, or remove it from config.imports in the run's config.json")
        if "." in name:   # a package's module: import it by name from the folder above the package
            root = os.path.dirname(path)
            for _ in range(name.count(".") + (os.path.basename(path) == "__init__.py")):
                root = os.path.dirname(root)
            if root not in sys.path:
                sys.path.insert(0, root)
            importlib.import_module(name)
        else:
            load_module(path, name)
