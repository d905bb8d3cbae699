"""The catalogue of bad input: one row per mistake a researcher can make in a config, method
options, data files, checkpoints, assets or command-line flags.

Every row must fail with ONE line that names the culprit (a config key, path or file:line) and
says how to fix it, and must leave the workdir as it was. `ROWS` run in process through the
functions the launcher calls (`train.train_and_evaluate`, `assets.*`); `CLI_ROWS` run
scripts/train.py itself, all at once, and also check exit status 2 and the single `error:` line.
The rows of your own data (ptune.data.files: data files, columns, labels, chats, splits, verbalizers,
Hub names offline) are tests/data/test_files.py's `ROWS` and `CLI_ROWS`, in the same form.
"""

import contextlib
import os
import re
import shutil
import subprocess
import sys
from typing import Callable, NamedTuple

import pytest
from test_checkpoint import setup_once, snapshot  # setup_once: runs of one config share one builder.setup

from ptune import assets
from ptune.config import base_config, with_method
from ptune.training import builder, checkpoint, train
from ptune.training import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAN = float("nan")


def tiny_config(method="lora", **overrides):
    """A 4-step run of gpt2-tiny on 64 synthetic examples, saving at steps 2 and 4."""
    config = with_method(base_config(), method)
    config.task.options = {"n_train": 64, "n_eval": 32}
    config.task.max_length = 32
    config.train.update(steps=4, batch_size=4, eval_batch_size=16, eval_every=100, log_every=1, progress=False)
    config.checkpoint.every_steps = 2
    for key, value in overrides.items():   # flattened keys; a new key (a typo) is added as given
        *parents, name = key.split(".")
        section = config
        for parent in parents:
            section = section[parent]
        with section.unlocked():
            section[name] = value
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny_config() workdir: checkpoints at steps 2 and 4."""
    workdir = tmp_path_factory.mktemp("trained")
    train.train_and_evaluate(tiny_config(), str(workdir))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    return workdir


class Bench:
    """What a row needs: `workdir` (snapshotted around the failing call), a trained copy, a data
    cache copy."""

    def __init__(self, tmp_path, trained, monkeypatch):
        self.tmp, self.workdir, self._trained, self.monkeypatch = tmp_path, tmp_path / "work", trained, monkeypatch
        self.stack = contextlib.ExitStack()   # what a row holds while its call fails
        self.workdir.mkdir()
        (self.workdir / "notes.txt").write_text("a file the failed run must leave alone")

    def run(self, config, workdir=None):
        return lambda: train.train_and_evaluate(config, str(workdir or self.workdir))

    def checkpointed(self):
        """The workdir becomes a copy of the trained one."""
        shutil.rmtree(self.workdir)
        shutil.copytree(self._trained, self.workdir)
        return self.workdir

    def data_cache(self, name="sentiment_imdb"):
        """A private asset cache ($PTUNE_CACHE) holding a copy of the converted data set `name`."""
        cache = self.tmp / "cache"
        shutil.copytree(assets.ensure(name), cache / "data" / name)
        self.monkeypatch.setenv("PTUNE_CACHE", str(cache))
        return cache / "data" / name


def edit_line(path, number, old, new):
    """Replace `old` by `new` (same length: the size check of the asset cache still passes) in line `number`."""
    assert len(old) == len(new)
    lines = path.read_text().splitlines(keepends=True)
    assert old in lines[number - 1]
    lines[number - 1] = lines[number - 1].replace(old, new, 1)
    path.write_text("".join(lines))


def spoil(path, how):
    """Truncate a file to half, or flip one bit in its middle (zstd may still decode it)."""
    data = bytearray(path.read_bytes())
    if how == "truncate":
        del data[len(data) // 2:]
    else:
        data[len(data) // 2] ^= 1
    path.write_bytes(data)


def biggest_array_file(workdir, item="trainable"):
    return max((workdir / "checkpoints" / "4" / item / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)


def verify_spoiled_data(bench):
    spoil(bench.data_cache() / "validation.jsonl", "flip")
    return lambda: assets.verify("sentiment_imdb")


def full_disk(bench):
    """4 kB free: less than the tiny run's checkpoints need."""
    bench.monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 4096, 4096))
    run = builder.setup(tiny_config())
    return lambda: workdir_lib.prepare(str(bench.workdir / "run"), checkpoint.space_needed(run))


class Row(NamedTuple):
    name: str
    make: Callable      # bench -> the call that must fail (set-up done)
    culprit: str        # regex: what is at fault
    fix: str            # regex: what to do about it
    config: Callable | None = None   # a config's mistake: () -> the config, also set up through the Python API


def config_row(name, culprit, fix, method="lora", **overrides):
    config = lambda: tiny_config(method, **overrides)
    return Row(name, lambda bench: bench.run(config()), culprit, fix, config)


def held_workdir(bench):
    """Another run holds the workdir."""
    bench.stack.enter_context(workdir_lib.owned(str(bench.workdir)))
    return bench.run(tiny_config())


def finished_without_checkpoints(bench):
    train.train_and_evaluate(tiny_config(**{"checkpoint.every_steps": 0}), str(bench.workdir))
    return bench.run(tiny_config(**{"checkpoint.every_steps": 0, "train.steps": 6}))


def resume_row(name, culprit, fix, method="lora", **overrides):
    """A run on the trained workdir that must refuse to resume."""
    def make(bench):
        bench.checkpointed()
        return bench.run(tiny_config(method, **overrides))
    return Row(name, make, culprit, fix)


def damaged_row(name, item, how, load=train.train_and_evaluate):
    def make(bench):
        workdir = bench.checkpointed()
        spoil(biggest_array_file(workdir) if item == "trainable" else workdir / "checkpoints" / "4" / item / "metadata",
              how)
        if load is checkpoint.load_adapter:
            return lambda: checkpoint.load_adapter(str(workdir))
        return bench.run(tiny_config())
    return Row(name, make, r"checkpoint .*/checkpoints/4 is damaged \(", r"delete .*/checkpoints/4 to resume from step 2")


def data_row(name, edit, culprit, fix):
    def make(bench):
        edit(bench.data_cache())
        # The byte tokenizer gives every verbalizer word the same first token: a fresh head instead.
        return bench.run(tiny_config(**{"task.name": "sentiment", "task.options": {"domain": "imdb"},
                                        "task.objective": "head"}))
    return Row(name, make, culprit, fix)


ROWS = [
    # configs
    config_row("unknown config key", r"unknown config key\(s\) \['config.train.stesp'\]", r"valid: \[.*'steps'",
               **{"train.stesp": 3}),
    config_row("unknown method", r"unknown method 'lorra'", r"choose one of \[.*'lora'", **{"method.name": "lorra"}),
    config_row("unknown method option", r"method 'lora' has no option\(s\) \['rnak'\]", r"its options are \['rank'",
               **{"method.rnak": 4}),
    config_row("unknown task", r"unknown task 'sst2'", r"choose one of \[.*'synthetic_sentiment'",
               **{"task.name": "sst2"}),
    config_row("unknown objective", r"config.task.objective='mlm'", r"choose auto or one of", **{"task.objective": "mlm"}),
    config_row("template index out of range", r"config.task.template_index=5",
               r"has 1 templates \(0..0\)", **{"task.template_index": 5}),
    config_row("unknown nonfinite policy", r"config.train.nonfinite='ignore'", r"choose 'stop' .* or 'skip'",
               **{"train.nonfinite": "ignore"}),
    config_row("non-finite learning rate", r"config.optim.learning_rate=nan x lr_scale=1.0",
               r"must be a finite number > 0", **{"optim.learning_rate": NAN}),
    config_row("infinite group learning rate", r"optimizer group 'lora': learning_rate=inf",
               r"config.optim.groups.lora", **{"optim.groups": {"lora": {"learning_rate": float("inf")}}}),
    config_row("optimizer group matching no label", r"optimizer group\(s\) \['prompt'\] match no trainable label",
               r"labels present: \['lora'\]", **{"optim.groups": {"prompt": {"learning_rate": 0.3}}}),
    config_row("checkpoint option out of range", r"config.checkpoint.keep=0", r"must be an integer >= 1",
               **{"checkpoint.keep": 0}),
    # numbers out of range
    config_row("negative step count", r"config.train.steps=-5", r"must be an integer >= 1", **{"train.steps": -5}),
    config_row("zero batch size", r"config.train.batch_size=0", r"must be an integer >= 1", **{"train.batch_size": 0}),
    config_row("zero eval interval", r"config.train.eval_every=0", r"must be an integer >= 1",
               **{"train.eval_every": 0}),
    config_row("zero max_length", r"config.task.max_length=0", r"must be an integer >= 1", **{"task.max_length": 0}),
    config_row("negative seed", r"config.seed=-1", r"must be an integer >= 0", seed=-1),
    config_row("negative warmup", r"config.optim.warmup_steps=-1", r"must be an integer >= 0",
               **{"optim.warmup_steps": -1}),
    config_row("group beta out of range", r"optimizer group 'lora': b2=1.5 must be a number in \[0, 1\)",
               r"set config.optim.<key> or config.optim.groups.lora.<key>", **{"optim.groups": {"lora": {"b2": 1.5}}}),
    config_row("negative clip norm", r"config.optim.clip_norm=-1.0", r"must be a finite number >= 0",
               **{"optim.clip_norm": -1.0}),
    config_row("model size out of range", r"model.num_layers=0", r"must be an integer >= 1", **{"model.num_layers": 0}),
    config_row("dropout out of range", r"model.dropout=1.5", r"must be a number in \[0, 1\)", **{"model.dropout": 1.5}),
    config_row("unknown eval split", r"task 'synthetic_sentiment' has no split 'dev'", r"splits: \['test', 'train'",
               **{"train.eval_split": "dev"}),
    config_row("imported file gone", r"imported /no/such/my_methods.py \(module 'my_methods'\), which does not exist",
               r"put it back, or remove it from config.imports", imports=("my_methods=/no/such/my_methods.py",)),
    config_row("best metric of another objective", r"config.checkpoint.best_metric='perplexity'",
               r"choose one of \('loss', 'accuracy'\)", **{"checkpoint.keep_best": 1, "checkpoint.best_metric": "perplexity"}),
    # method options and masks
    config_row("rank out of range", r"method lora: rank=0", r"must be a positive integer", **{"method.rank": 0}),
    config_row("prompt length out of range", r"method prompt: length=200", r"must be < 128 \(the model's context\)",
               method="prompt", **{"method.length": 200}),
    config_row("prompt + text longer than the context", r"task.max_length 64 \+ prompt/prefix length 100",
               r"exceeds the model's context of 128; shorten one of them", method="prompt",
               **{"method.length": 100, "task.max_length": 64}),
    config_row("rule matching nothing", r"method lora: targets '.*q_proj.*' match no layer",
               r"linear layers are e.g. \[.*'transformer/h_N/attn/c_attn'", **{"method.targets": ["q_proj"]}),
    config_row("invalid target regex", r"targets 'c_attn\(' is not a valid regex", r"give a list of module names",
               **{"method.targets": "c_attn("}),
    config_row("conflicting composed labels",
               r"composed methods label 'transformer/h_0/attn/c_attn/lora_a' differently: 'full' from full, "
               r"'lora' from lora", r"drop one of them or change its rules", method="full+lora"),
    # meshes and batches
    config_row("bad mesh shape", r"config.mesh \{'data': 3, 'fsdp': 1, 'tensor': 1\} does not divide the 1 devices",
               r"choose sizes whose product divides", **{"mesh.data": 3}),
    config_row("two -1 mesh axes", r"config.mesh \{'data': -1, 'fsdp': -1", r"at most one -1",
               **{"mesh.fsdp": -1}),
    config_row("invalid shard_sites regex", r"config.mesh.shard_sites='\(' is not a valid regex", r"fix it",
               **{"mesh.shard_sites": "("}),
    config_row("grad_accum not dividing the batch", r"config.train.grad_accum=3", r"dividing config.train.batch_size=4",
               **{"train.grad_accum": 3}),
    Row("batch not divisible by the devices",
        lambda bench: lambda: builder.check_batch_sizes(tiny_config().train, 8),
        r"config.train.batch_size=4 \(in 1 micro-batch\(es\)\) is not divisible by the 8 data-parallel devices",
        r"use a multiple of 8"),
    # data
    config_row("empty split", r"task 'synthetic_sentiment': split 'train' is empty", r"give it examples",
               **{"task.options": {"n_train": 0}}),
    data_row("malformed JSONL line", lambda d: edit_line(d / "train.jsonl", 7, '{"text"', '["text"'),
             r"/data/sentiment_imdb/train.jsonl:7: not valid JSON", r"fix or delete that line"),
    data_row("label outside the label set", lambda d: edit_line(d / "train.jsonl", 3, '"label": 0', '"label": 7'),
             r"task 'sentiment_imdb': split 'train' \(.*/train.jsonl\) example 2 has label 7, outside the label set "
             r"0..1 \(negative, positive\)", r"fix that example's label"),
    # assets
    config_row("missing model checkpoint", r"config.model.checkpoint='/no/such/model'",
               r"fix the name or the path", **{"model.checkpoint": "/no/such/model"}),
    Row("missing data asset", lambda bench: lambda: assets.path("genre", cache_dir=bench.workdir),
        r"asset 'genre': .*/data/genre is missing", r"Fix: python scripts/assets.py fetch genre --cache_dir"),
    Row("missing model asset", lambda bench: lambda: assets.path("smollm2", cache_dir=bench.workdir),
        r"asset 'smollm2': .* is missing", r"Fix: python scripts/assets.py fetch smollm2"),
    Row("unknown asset", lambda bench: lambda: assets.ensure("sst2", cache_dir=bench.workdir),
        r"unknown asset 'sst2'", r"assets: \[.*'genre'"),
    Row("checksum mismatch of a converted file", verify_spoiled_data,
        r"checksum mismatch for .*/validation.jsonl: expected sha256 \w+, got \w+", r"fetch --force sentiment_imdb"),
    # checkpoints
    damaged_row("truncated checkpoint array", "trainable", "truncate"),
    damaged_row("flipped bit in a checkpoint array", "trainable", "flip"),
    damaged_row("truncated checkpoint record", "meta", "truncate"),
    damaged_row("damaged checkpoint, loaded for serving", "trainable", "flip", load=checkpoint.load_adapter),
    resume_row("checkpoint from another method", r"written by method 'lora' but this run uses 'prompt'",
               r"set config.method.name='lora' or use a fresh --workdir", method="prompt"),
    resume_row("checkpoint of another shape",
               r"trainable 'transformer/h_0/attn/c_attn/lora_a' is float32\[64, 8\] in checkpoint .*/checkpoints/4 "
               r"but float32\[64, 4\] in this run", r"use the config the checkpoint was written with",
               **{"method.rank": 4}),
    resume_row("base model hash mismatch", r"the frozen base differs from the one checkpoint .*/checkpoints/4 was "
               r"trained on", r"set config.checkpoint.allow_base_mismatch=True", **{"model.frozen_dtype": "bfloat16"}),
    resume_row("changed data order", r"written with data batch_size=4 but this run has 8",
               r"restore the seed, batch size and task data", **{"train.batch_size": 8}),
    resume_row("checkpoint past the last step", r"checkpoint .*/checkpoints/4 is past config.train.steps=3",
               r"set train.steps >= 4", **{"train.steps": 3}),
    # the workdir
    Row("workdir under a file", lambda bench: lambda: workdir_lib.prepare(str(bench.workdir / "notes.txt" / "run")),
        r"workdir '.*/notes.txt/run' is not writable \(Not a directory\)", r"choose another --workdir"),
    Row("full disk", full_disk, r"workdir '.*' has 4.10 kB free but the run's checkpoints need about",
        r"free some space, lower config.checkpoint.keep, or choose another --workdir"),
    Row("workdir held by another run", held_workdir, r"workdir '.*/work' is in use by the run of pid \d+ on host",
        r"wait for it to end, stop it, or choose another --workdir"),
    Row("more steps for a finished run without checkpoints", finished_without_checkpoints,
        r"holds a finished run of 4 steps but no checkpoint to train further from", r"choose another --workdir"),
]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")   # Orbax after a failed read
@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_bad_input(row, tmp_path, trained, monkeypatch):
    bench = Bench(tmp_path, trained, monkeypatch)
    with bench.stack:
        failing = row.make(bench)
        before = snapshot(bench.workdir)
        with pytest.raises(ValueError) as error:
            failing()
        assert_one_line(str(error.value), row)
        assert snapshot(bench.workdir) == before


def assert_one_line(message, row):
    assert "\n" not in message
    assert re.search(row.culprit, message), message
    assert re.search(row.fix, message), message


@pytest.mark.parametrize("row", [r for r in ROWS if r.config], ids=[r.name for r in ROWS if r.config])
def test_bad_input_through_the_python_api(row):
    """The same mistakes through the notebook's door, `ptune.setup`: the same one-line message."""
    import ptune
    with pytest.raises(ValueError) as error:
        ptune.setup(row.config())
    assert_one_line(str(error.value), row)


def test_catalogue_covers_the_issue():
    assert len(ROWS) + len(CLI_ROWS) >= 25 and len({r.name for r in ROWS + CLI_ROWS}) == len(ROWS) + len(CLI_ROWS)


class CliRow(NamedTuple):
    name: str
    flags: list         # scripts/train.py's flags after the tiny run's; a leading ':arg' is the config's argument,
    culprit: str        # a leading '@name' makes CONFIG_FILES[name] the config file
    fix: str


# Config files a new user gets wrong, each beside the module `my_methods.py` it may import.
CONFIG_FILES = {
    "syntax.py": "from ptune.config import base_config\ndef get_config(:\n    return base_config()\n",
    "typo_import.py": "import my_methds\n",
    "raising.py": "from ptune.config import base_config\n\n\n"
                  "def get_config():\n    raise RuntimeError('no GPU here')\n",
    "no_return.py": "from ptune.config import base_config\n\n\ndef get_config():\n    base_config()\n",
    "no_get_config.py": "from ptune.config import base_config\nconfig = base_config()\n",
}


CLI_ROWS = [
    CliRow("cli: unknown method", ["--config.method.name=lorra"], r"unknown method 'lorra'",
           r"choose one of"),
    CliRow("cli: context too long", ["--config.task.max_length=200"],
           r"task.max_length 200 \+ prompt/prefix length 0 exceeds the model's context of 128", r"shorten one of them"),
    CliRow("cli: unknown flag", ["--workdri=/tmp/x"], r"Unknown command line flag 'workdri'",
           r"Did you mean: workdir"),
    CliRow("cli: unknown config key", ["--config.train.stesp=3"], r"'stesp'",
           r"Did you mean \"steps\""),
    CliRow("cli: value of the wrong type", ["--config.train.steps=many"], r"many", r"helpshort"),
    CliRow("cli: checkpoint from another method", [":prompt"],
           r"written by method 'lora' but this run uses 'prompt'", r"set config.method.name='lora'"),
    CliRow("cli: negative step count", ["--config.train.steps=-5"], r"config.train.steps=-5",
           r"must be an integer >= 1"),
    CliRow("cli: optimizer group of a label the method lacks", ["--config.optim.groups.prompt.learning_rate=0.3"],
           r"optimizer group\(s\) \['prompt'\] match no trainable label", r"labels present: \['lora'\]"),
    CliRow("cli: option of another method", ["--config.method.name=prompt", "--config.method.rank=4"],
           r"--config.method.rank names no config key: 'rank'", r"see --helpshort"),
    CliRow("cli: option of another task", ["--config.task.options.domian=imdb"],
           r"--config.task.options.domian names no config key: 'domian'", r"see --helpshort"),
    CliRow("cli: config argument the config refuses", [":lorra"],
           r"experiments/default.py:\d+: get_config\('lorra'\) raised UserError: unknown method 'lorra'",
           r"choose one of \["),
    CliRow("cli: missing config file", ["@missing.py"], r"config file '.*/missing.py' does not exist",
           r"give the path of a Python file"),
    CliRow("cli: config file syntax error", ["@syntax.py"], r"/syntax.py:2: invalid syntax: 'def get_config\(:'",
           r"fix the syntax"),
    CliRow("cli: config file importing a missing module", ["@typo_import.py"],
           r"/typo_import.py:1: loading .* raised ModuleNotFoundError: No module named 'my_methds'",
           r"install it, or put my_methds.py beside the config file"),
    CliRow("cli: get_config raising", ["@raising.py"],
           r"/raising.py:5: get_config\(\) raised RuntimeError: no GPU here",
           r"raised RuntimeError"),
    CliRow("cli: get_config returning nothing", ["@no_return.py"],
           r"no_return.py: get_config\(\) returned NoneType, not a ConfigDict", r"return ptune.config.base_config\(\)"),
    CliRow("cli: config file without get_config", ["@no_get_config.py"],
           r"config file '.*/no_get_config.py' defines no get_config\(\)", r"add one returning a ConfigDict"),
]


@pytest.fixture(scope="module")
def cli_results(trained, tmp_path_factory):
    """Every CLI row's (workdir, snapshot before, finished process), launched concurrently."""
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
    configs = tmp_path_factory.mktemp("configs")
    for name, text in CONFIG_FILES.items():
        (configs / name).write_text(text)
    started = {}
    for row in CLI_ROWS:
        workdir = tmp_path_factory.mktemp("cli")
        if "checkpoint" in row.name:
            shutil.copytree(trained, workdir, dirs_exist_ok=True)
        flags = list(row.flags)
        config = os.path.join(ROOT, "experiments/default.py") + (flags.pop(0) if flags[0].startswith(":") else "")
        if flags and flags[0].startswith("@"):
            config = str(configs / flags.pop(0)[1:])
        cmd = [sys.executable, os.path.join(ROOT, "scripts/train.py"), "--config", config, f"--workdir={workdir}",
               "--config.train.progress=False", "--config.train.steps=4", "--config.train.batch_size=4",
               "--config.task.max_length=32", "--config.checkpoint.every_steps=2", *flags]
        before = snapshot(workdir)
        started[row.name] = workdir, before, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                              text=True, env=env)
    return {name: (workdir, before, proc, proc.communicate(timeout=300)) for name, (workdir, before, proc)
            in started.items()}


@pytest.mark.parametrize("row", CLI_ROWS, ids=[r.name for r in CLI_ROWS])
def test_bad_command_line(row, cli_results):
    workdir, before, proc, (_, stderr) = cli_results[row.name]
    assert proc.returncode == 2, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-2000:]
    assert re.search(row.culprit, errors[0]) and re.search(row.fix, errors[0]), errors[0]
    assert snapshot(workdir) == before


def test_record_is_checked_before_any_array_is_read(trained, tmp_path, monkeypatch):
    """Trust: a checkpoint that does not match the run is refused on its JSON record alone."""
    read = []
    monkeypatch.setattr(checkpoint, "_restore_tree", lambda *args: read.append(args))
    workdir = shutil.copytree(trained, tmp_path / "run")
    for config in (tiny_config("prompt"), tiny_config(**{"method.rank": 4}), tiny_config(**{"train.batch_size": 8})):
        with pytest.raises(ValueError, match=r"checkpoint .*/checkpoints/4"):
            train.train_and_evaluate(config, str(workdir))
    assert read == []
