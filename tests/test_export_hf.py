"""A trained model loads anywhere: `scripts/assets.py export-hf` writes a shipped model as a
transformers directory, an exported adapter names a base transformers loads (PEFT then reproduces
ptune's logits from that path alone), and exporting or loading logs no warning."""

import contextlib
import json
import logging
import os
import re
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from ptune import assets, methods, models, partition  # noqa: E402
from ptune.data import batching  # noqa: E402
from ptune.interop import hf_peft  # noqa: E402
from ptune.models import hf, pretrained  # noqa: E402
from ptune.training import builder, checkpoint, train  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import assets as assets_cli  # noqa: E402  (scripts/assets.py)

TEXTS = ["The capital of France is", "Héllo wörld! 123 <|im_start|>user\nhi<|im_end|>", "  tabs\tand\nnewlines "]
# SmolLM2's residual stream reaches |x| ~ 2e4, where float32 rounds at ~1e-3 (tests/models/test_shipped.py).
SMOLLM2_TOL, TOL = 5e-4, 1e-4


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.mark.slow   # SmolLM2 in ptune and in transformers (~15 s)
def test_export_hf_smollm2_matches_ptune(tmp_path, capsys):
    """The GGUF dequantized to a transformers directory: same logits, same token ids, same chat template."""
    assert assets_cli.main(["export-hf", "smollm2", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out.split()[-1]
    gguf = assets.path("smollm2")
    cfg, params = pretrained.load(gguf)
    ours = pretrained.load_tokenizer(gguf).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert theirs(text)["input_ids"] == ours(text)["input_ids"], text
    chat = [{"role": "user", "content": "hi"}]
    assert theirs.apply_chat_template(chat, tokenize=False) == ours.apply_chat_template(chat, tokenize=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.eos_token_id == ours.eos_token_id   # transformers' generate stops at <|im_end|>
    ids = np.asarray([ours(TEXTS[0])["input_ids"]])
    assert np.abs(np.asarray(models.build(cfg).apply({"params": params}, ids)) - _logits(model, ids)).max() < \
        SMOLLM2_TOL


def test_export_hf_minilm_copies_its_directory(tmp_path, capsys):
    assert assets_cli.main(["export-hf", "minilm", str(tmp_path / "hf")]) == 0
    source = assets.path("minilm")
    assert f"already is a transformers directory, {source}" in capsys.readouterr().out
    copied = sorted(str(p.relative_to(tmp_path / "hf")) for p in (tmp_path / "hf").rglob("*") if p.is_file())
    assert copied == sorted(str(p.relative_to(source)) for p in source.rglob("*")
                            if p.is_file() and p.name != "MANIFEST.json")
    transformers.AutoModel.from_pretrained(str(tmp_path / "hf"))


@contextlib.contextmanager
def _warnings_logged():
    """Every WARNING-or-worse record logged through Python logging (absl's logger included)."""
    records, handler = [], logging.Handler(logging.WARNING)
    handler.emit = records.append
    loggers = [logging.getLogger(), logging.getLogger("absl")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield records
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def _hf_dir_base(directory, preset="llama-tiny", asset="smollm2"):
    """A tiny random base with a shipped model's tokenizer (and its vocabulary size), as a local HF directory."""
    tokenizer = pretrained.load_tokenizer(assets.ensure(asset)).tokenizer
    cfg = models.model_config(preset, vocab_size=len(tokenizer))
    model = models.build(cfg)
    params = nn.unbox(model.init(jax.random.key(0), np.ones((1, 4), np.int32), output="hidden")["params"])
    return hf_peft.save_pretrained_merged(directory, params, model, tokenizer=tokenizer)


def _run_printed(lines: str) -> dict:
    """What the lines `scripts/export.py` prints define, run as printed."""
    namespace = {}
    exec(lines, namespace)
    return namespace


def test_adapter_names_its_hf_directory_base_and_exports_without_warnings(make_config, tmp_path, monkeypatch,
                                                                          capfd):
    """A run on a local HF directory (given as a relative path): the adapter names its absolute path,
    the printed lines load base + adapter in PEFT from anywhere and give ptune's logits, and neither
    export nor load_adapter logs a warning (Orbax's read-only notice was one)."""
    monkeypatch.chdir(tmp_path)
    _hf_dir_base(tmp_path / "base")
    config = make_config("lora", steps=3)
    config.model.checkpoint = "base"
    config.optim.learning_rate = 1e-2
    train.train_and_evaluate(config, str(tmp_path / "run"))
    capfd.readouterr()
    with _warnings_logged() as records:
        out = hf_peft.export_workdir("run", "peft")
        checkpoint.load_adapter("run")
    assert not records, [r.getMessage() for r in records]
    assert "warn" not in capfd.readouterr().err.lower()
    assert json.loads((out / hf_peft.ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == str(tmp_path / "base")

    run = builder.setup(config)
    params = partition.merge(checkpoint.load_adapter("run")[1], partition.split(run.params, run.labels)[1])
    ids = np.asarray([run.tokenizer.tokenizer(TEXTS[0])["input_ids"]])
    want = np.asarray(run.model.apply({"params": params}, ids))
    lines = hf_peft.how_to_load(out)
    monkeypatch.chdir(os.path.dirname(tmp_path))   # the names work from anywhere
    loaded = _run_printed(lines)
    assert loaded["tokenizer"](TEXTS[0])["input_ids"] == ids[0].tolist()
    lora_b = loaded["model"].base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert float(lora_b.abs().max()) > 0   # trained away from B = 0, so the comparison can fail
    assert np.abs(want - _logits(loaded["model"].eval(), ids)).max() < TOL


@pytest.mark.slow
def test_classifier_adapter_prints_its_class_count(tmp_path):
    """A BERT LoRA + head adapter loads through AutoModelForSequenceClassification with the head's class
    count, which the printed lines read from the adapter file."""
    base = _hf_dir_base(tmp_path / "base", "bert-tiny", "minilm")
    cfg = pretrained.config_from_hf(json.loads((base / "config.json").read_text()), num_labels=3)
    method = methods.compose(methods.get("lora", cfg, rank=2), methods.get("head", cfg))
    model = models.build(cfg, method.sites)
    _, state = pretrained.read_hf_dir(base)
    params = hf.from_hf(cfg.family, state, nn.unbox(models.abstract_params(model)))
    trainable, frozen = partition.split(params, method.labels(params))
    rng = np.random.default_rng(0)
    trainable = jax.tree.map(lambda x: (0.3 * rng.standard_normal(x.shape)).astype(np.float32), trainable)
    out = hf_peft.export(tmp_path / "peft", partition.merge(trainable, frozen), method, cfg, base_name=str(base))
    lines = hf_peft.how_to_load(out)
    assert f"AutoModelForSequenceClassification.from_pretrained({str(base)!r}, num_labels=3)" in lines
    loaded = _run_printed(lines)
    batch = loaded["tokenizer"](TEXTS, padding=True, return_tensors="np")
    want = np.asarray(model.apply({"params": partition.merge(trainable, frozen)}, batch["input_ids"],
                                  batch["attention_mask"], output="class"))
    with torch.no_grad():
        got = loaded["model"].eval()(input_ids=torch.tensor(batch["input_ids"]),
                                     attention_mask=torch.tensor(batch["attention_mask"])).logits.numpy()
    assert np.abs(want - got).max() < TOL


@pytest.mark.slow
def test_smollm2_adapter_loads_in_peft_from_its_config(make_config, tmp_path):
    """The quickstart's case, a LoRA on the GGUF asset: the adapter names the GGUF's transformers copy
    (written once into the cache), from which PEFT reproduces ptune's logits (~100 s on 2 CPU cores)."""
    config = make_config("lora", steps=2)
    config.model.checkpoint = "smollm2"
    config.task.options = {"n_train": 16, "n_eval": 8}
    config.optim.learning_rate = 1e-2
    train.train_and_evaluate(config, str(tmp_path / "run"))
    out = hf_peft.export_workdir(tmp_path / "run", tmp_path / "peft")
    base = json.loads((out / hf_peft.ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    assert base == str(assets.path("smollm2")) + ".hf"
    loaded = _run_printed(hf_peft.how_to_load(out))
    run = builder.setup(config)
    params = partition.merge(checkpoint.load_adapter(str(tmp_path / "run"))[1],
                             partition.split(run.params, run.labels)[1])
    ids = np.asarray([loaded["tokenizer"](TEXTS[0])["input_ids"]])
    want = np.asarray(run.model.apply({"params": params}, ids))
    assert np.abs(want - _logits(loaded["model"].eval(), ids)).max() < SMOLLM2_TOL


# ------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("argv,message", [
    (["export-hf", "nope", "{tmp}/hf"], r"error: export-hf: 'nope' is not a model asset; choose one of "
                                        r"\['minilm', 'smollm2'\]"),
    (["export-hf", "sentiment", "{tmp}/hf"], r"error: export-hf: 'sentiment' is not a model asset"),
    (["export-hf", "minilm", "{tmp}"], r"error: .* already exists and is not an empty directory; choose a new "
                                       r"output directory or remove it"),
])
def test_export_hf_refuses_in_one_line(argv, message, tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("mine")
    assert assets_cli.main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.match(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]   # nothing written, no temporary left


@pytest.mark.parametrize("base,merge,message", [
    ("{tmp}", False, r"base '.*' has no config.json; pass a transformers model directory, e.g. one written by "
                     r"`python scripts/assets.py export-hf smollm2 DIR`"),
    ("{tmp}", True, r"base='.*' names an adapter's base, but a merged checkpoint holds its own; drop base or merge"),
])
def test_export_refuses_a_base_it_cannot_name(base, merge, message, tmp_path):
    """Checked before the run is loaded, so no workdir is needed."""
    with pytest.raises(ValueError, match=message):
        hf_peft.export_workdir(tmp_path / "no-run", tmp_path / "out", merge=merge, base=base.format(tmp=tmp_path))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_preset_exports_say_what_loads(make_config, tmp_path):
    """A random-init preset: the adapter names the preset and the printed text says transformers cannot
    load it; the merged checkpoint has no tokenizer files (bytes), and its printed lines load it."""
    train.train_and_evaluate(make_config("lora", steps=1), str(tmp_path / "run"))
    out = hf_peft.export_workdir(tmp_path / "run", tmp_path / "peft")
    assert json.loads((out / hf_peft.ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == "gpt2-tiny"
    assert hf_peft.how_to_load(out).startswith("note: the adapter's base 'gpt2-tiny' is no transformers directory")
    merged = hf_peft.export_workdir(tmp_path / "run", tmp_path / "merged", merge=True)
    lines = hf_peft.how_to_load(merged)
    assert "AutoTokenizer" not in lines
    assert _run_printed(lines)["model"].config.model_type == "gpt2"


def test_export_builds_no_data_and_no_optimizer(make_config, tmp_path, monkeypatch):
    """Exporting an adapter rebuilds only its base and method: no split is tokenised, no optimizer built."""
    train.train_and_evaluate(make_config("lora", steps=1), str(tmp_path / "run"))

    def refuse(*args, **kwargs):
        raise AssertionError("export tokenised data or built an optimizer")
    monkeypatch.setattr(batching, "encode", refuse)
    monkeypatch.setattr(builder, "optimizer", refuse)
    out = hf_peft.export_workdir(tmp_path / "run", tmp_path / "peft")
    assert (out / hf_peft.ADAPTER_CONFIG).is_file()
