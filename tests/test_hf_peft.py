"""HF PEFT interop: ptune adapters load in `peft.PeftModel`, PEFT adapters load in ptune, and
merged LoRA/IA3 checkpoints load in transformers, all with matching logits (tiny random models,
every site perturbed away from identity)."""

import atexit
import dataclasses
import functools
import json
import pathlib
import shutil
import tempfile

import flax.linen as nn
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from ptune import methods, models, partition  # noqa: E402
from ptune.interop import hf_peft  # noqa: E402
from ptune.models import hf, pretrained  # noqa: E402

PAD = 0
IDS = np.array([[11, 12, 13, 14, 15, 16], [17, 18, 19, 20, PAD, PAD]], np.int32)
MASK = (IDS != PAD).astype(np.int32)                       # right padding in row 1
REAL = MASK.astype(bool)
TOL = 1e-4
# Method options that move every choice away from the defaults PEFT would guess.
OPTIONS = {
    "lora": {"gpt2-tiny": dict(rank=2, alpha=5.0, targets=["c_attn", "mlp.c_proj"]),
             "llama-tiny": dict(rank=2, alpha=3.0, rslora=True, targets=["q_proj", "v_proj", "down_proj"]),
             "qwen3-tiny": dict(rank=2, alpha=3.0, targets=["q_proj", "k_proj", "o_proj"]),   # k_proj: under k_norm
             "bert-tiny": dict(rank=2, alpha=5.0)},
    "ia3": {}, "prompt": dict(length=3, init="uniform"), "prefix": dict(length=3, hidden=16),
}
CASES = [(preset, name) for preset in ("gpt2-tiny", "llama-tiny", "bert-tiny", "qwen3-tiny")
         for name in ("lora", "ia3", "prompt", "prefix") if (preset, name) != ("bert-tiny", "prefix")]
# PEFT configs for adapters made in torch.
# GPT-2's LoRA covers only layer 1: ptune reads the layers from the file's keys.
PEFT_CONFIGS = {"lora": lambda task, preset: peft.LoraConfig(
                    task_type=task, r=2, lora_alpha=6, use_rslora=preset == "llama-tiny",
                    layers_to_transform=[1] if preset == "gpt2-tiny" else None),
                "ia3": lambda task, preset: peft.IA3Config(task_type=task),
                "prompt": lambda task, preset: peft.PromptTuningConfig(task_type=task, num_virtual_tokens=3),
                "prefix": lambda task, preset: peft.PrefixTuningConfig(
                    task_type=task, num_virtual_tokens=3, prefix_projection=preset == "gpt2-tiny",
                    encoder_hidden_size=16)}

_TMP = pathlib.Path(tempfile.mkdtemp(prefix="ptune-hf-peft-"))
atexit.register(shutil.rmtree, _TMP, True)


def _config(preset):
    """BERT classifies (ptune has no BERT LM head); the decoders are language models."""
    return models.model_config(preset, num_labels=3 if preset == "bert-tiny" else 0)


def _method(cfg, preset, name):
    options = OPTIONS[name].get(preset, {}) if name == "lora" else OPTIONS[name]
    method = methods.get(name, cfg, **options)
    return methods.compose(method, methods.get("head", cfg)) if cfg.num_labels else method


@functools.cache
def _base(preset):
    """(config, base params, HF directory of the same weights) — written by save_pretrained_merged."""
    cfg = _config(preset)
    model = models.build(cfg)
    params = nn.unbox(model.init(jax.random.key(0), IDS, output="hidden")["params"])   # eager: shared compiles
    return cfg, params, hf_peft.save_pretrained_merged(_TMP / f"base-{preset}", params, model)


@functools.cache
def _trained(preset, name):
    """(config, method, model, params): the base plus every trained leaf drawn at random."""
    cfg, base, _ = _base(preset)
    method = _method(cfg, preset, name)
    model = models.build(cfg, method.sites)
    params = nn.unbox(model.init(jax.random.key(0), IDS, output="hidden")["params"])
    _, frozen = partition.split(params, method.labels(params))
    return cfg, method, model, partition.merge(frozen, _random_trainable(params, method))


def _random_trainable(params, method):
    trainable, _ = partition.split(params, method.labels(params))
    rng = np.random.default_rng(1)
    draw = lambda p, x: (1 + 0.3 * rng.standard_normal(x.shape) if p.endswith("/ia3")
                         else 0.3 * rng.standard_normal(x.shape)).astype(np.float32)
    return partition.unflatten({p: draw(p, x) for p, x in partition.flatten(trainable).items()})


def _ptune(cfg, model, params):
    return np.asarray(model.apply({"params": params}, IDS, MASK, output="class" if cfg.num_labels else "logits"))


def _hf_model(base_dir, cfg):
    auto = transformers.AutoModelForSequenceClassification if cfg.num_labels else transformers.AutoModelForCausalLM
    return auto.from_pretrained(str(base_dir)).eval()


def _torch(model):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(IDS, dtype=torch.long), attention_mask=torch.tensor(MASK)).logits
    return logits.numpy()[:, -IDS.shape[1]:] if logits.ndim == 3 else logits.numpy()   # drop soft-prompt rows


def _max_diff(got, want):
    """Over real tokens (LM logits) or every class logit."""
    diff = np.abs(got - want)
    return float((diff[REAL] if diff.ndim == 3 else diff).max())


@pytest.mark.parametrize("preset,name", CASES)
def test_export_loads_in_peft_with_matching_logits(preset, name):
    cfg, method, model, params = _trained(preset, name)
    out = hf_peft.export(_TMP / f"export-{preset}-{name}", params, method, cfg, base_name="tiny")
    config = json.loads((out / hf_peft.ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == models.sites.KINDS[name].peft_type and config["base_model_name_or_path"] == "tiny"
    reference = peft.PeftModel.from_pretrained(_hf_model(_base(preset)[2], cfg), str(out)).eval()
    diff = _max_diff(_ptune(cfg, model, params), _torch(reference))
    print(f"export {preset} {name}: max |logit diff| {diff:.2e}")
    assert diff < TOL


def test_export_names_peft_options():
    cfg, method, _, params = _trained("gpt2-tiny", "lora")
    config = json.loads((hf_peft.export(_TMP / "names", params, method, cfg) / hf_peft.ADAPTER_CONFIG).read_text())
    # mlp.c_proj, not c_proj: attn.c_proj has no LoRA. GPT-2's Conv1D layers store (in, out).
    assert (config["target_modules"], config["r"], config["lora_alpha"]) == (["c_attn", "mlp.c_proj"], 2, 5.0)
    assert config["fan_in_fan_out"] and not config["use_rslora"]
    cfg, method, _, params = _trained("bert-tiny", "ia3")
    config = json.loads((hf_peft.export(_TMP / "names-ia3", params, method, cfg) / hf_peft.ADAPTER_CONFIG).read_text())
    assert config["target_modules"] == ["key", "output.dense", "value"]
    assert config["feedforward_modules"] == ["output.dense"] and config["modules_to_save"] == ["classifier"]


def _peft_adapter(preset, name):
    """A PEFT adapter made in torch with every trainable tensor drawn at random; (reference logits, dir)."""
    cfg, _, base_dir = _base(preset)
    torch.manual_seed(0)
    task = "SEQ_CLS" if cfg.num_labels else "CAUSAL_LM"
    model = peft.get_peft_model(_hf_model(base_dir, cfg), PEFT_CONFIGS[name](task, preset))
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(1 + 0.3 * torch.randn_like(p) if "ia3_l" in param_name else 0.3 * torch.randn_like(p))
    out = _TMP / f"peft-{preset}-{name}"
    model.eval().save_pretrained(str(out))
    return _torch(model), out


@pytest.mark.parametrize("preset,name", CASES)
def test_peft_adapter_imports_with_matching_logits(preset, name):
    cfg, _, base_dir = _base(preset)
    want, adapter = _peft_adapter(preset, name)
    method, trainable = hf_peft.load(adapter, cfg)
    if (preset, name) == ("gpt2-tiny", "lora"):   # made with layers_to_transform=[1]
        assert [p for p in partition.flatten(trainable) if "/lora_" in p] == [
            "transformer/h_1/attn/c_attn/lora_a", "transformer/h_1/attn/c_attn/lora_b"]
    model = models.build(cfg, method.sites)
    _, state = pretrained.read_hf_dir(base_dir)
    template = hf.from_hf(cfg.family, state, nn.unbox(models.abstract_params(model)))   # sites still abstract
    _, frozen = partition.split(template, method.labels(template))
    diff = _max_diff(_ptune(cfg, model, partition.merge(trainable, frozen)), want)
    print(f"import {preset} {name}: max |logit diff| {diff:.2e}")
    assert diff < TOL


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny", "bert-tiny", "qwen3-tiny"])
def test_merged_lora_and_ia3_load_in_transformers(preset):
    cfg, _, _ = _base(preset)
    method = methods.get("lora+ia3", cfg, lora=OPTIONS["lora"][preset])
    model = models.build(cfg, method.sites)
    params = nn.unbox(model.init(jax.random.key(0), IDS, output="hidden")["params"])
    params = partition.merge(partition.split(params, method.labels(params))[1], _random_trainable(params, method))
    out = hf_peft.save_pretrained_merged(_TMP / f"merged-{preset}", params, model)
    merged, sites = hf_peft.merge(params, model)
    assert not any(hf.is_site(p) for p in partition.flatten(merged)) and sites == models.Sites()
    diff = _max_diff(_ptune(cfg, model, params), _torch(_hf_model(out, cfg)))
    print(f"merge {preset} lora+ia3: max |logit diff| {diff:.2e}")
    assert diff < TOL


def test_config_round_trips_through_hf():
    """num_labels belongs to the task, not the checkpoint: loading leaves it to the run (builder.setup)."""
    for cfg in (_config("gpt2-tiny"), _config("llama-tiny"), _config("bert-tiny"),
                models.model_config("llama-tiny", qkv_bias=True, tie_embeddings=True, num_labels=2)):
        assert pretrained.config_from_hf(pretrained.config_to_hf(cfg)) == dataclasses.replace(cfg, num_labels=0)
    assert pretrained.config_to_hf(_config("bert-tiny"))["architectures"] == ["BertForSequenceClassification"]
    assert pretrained.config_to_hf(models.model_config("llama-tiny", qkv_bias=True))["architectures"] == [
        "Qwen2ForCausalLM"]


# ------------------------------------------------------------------------------------------- bad input

def _abstract(preset, name, **options):
    cfg = _config(preset)
    method = methods.get(name, cfg, **options)
    return cfg, method, nn.unbox(models.abstract_params(models.build(cfg, method.sites)))


@pytest.mark.parametrize("preset,name,options,message", [
    ("gpt2-tiny", "adapter", {}, "bottleneck adapters, which PEFT has no format for"),
    ("gpt2-tiny", "lora+prompt", {}, r"sites \['lora', 'prompt'\]; a PEFT adapter holds exactly one"),
    ("gpt2-tiny", "bitfit", {}, "has no sites"),
    ("bert-tiny", "ptuning_v2", {}, "transformers' BERT models do not accept"),
])
def test_export_refuses_what_peft_cannot_hold(preset, name, options, message):
    cfg, method, params = _abstract(preset, name, **options)
    with pytest.raises(ValueError, match=message):
        hf_peft.export(_TMP / "refused", params, method, cfg)
    assert not (_TMP / "refused").exists()


def test_merge_refuses_sites_it_cannot_fold():
    cfg, method, model, params = _trained("gpt2-tiny", "prompt")
    with pytest.raises(ValueError, match=r"also has \['prompt'\] sites; export those as a PEFT adapter"):
        hf_peft.save_pretrained_merged(_TMP / "merged-prompt", params, model)
    assert not (_TMP / "merged-prompt").exists()


def test_export_never_overwrites():
    cfg, method, _, params = _trained("gpt2-tiny", "lora")
    out = _TMP / "occupied"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists and is not an empty directory"):
        hf_peft.export(out, params, method, cfg)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not [p for p in _TMP.iterdir() if p.name.startswith(".occupied.")]   # no temporary left behind


@functools.cache
def _good_adapter():
    cfg, method, _, params = _trained("gpt2-tiny", "lora")
    return cfg, hf_peft.export(_TMP / "good", params, method, cfg)


def _broken(edit_config=None, edit_tensors=None):
    """A copy of a good GPT-2 LoRA adapter with its config and/or tensors edited."""
    from safetensors.numpy import load_file, save_file
    _, good = _good_adapter()
    out = pathlib.Path(tempfile.mkdtemp(dir=_TMP))
    shutil.copytree(good, out, dirs_exist_ok=True)
    if edit_config:
        config = json.loads((good / hf_peft.ADAPTER_CONFIG).read_text())
        edit_config(config)
        (out / hf_peft.ADAPTER_CONFIG).write_text(json.dumps(config))
    if edit_tensors:
        tensors = load_file(str(good / hf_peft.ADAPTER_WEIGHTS))
        edit_tensors(tensors)
        save_file(tensors, str(out / hf_peft.ADAPTER_WEIGHTS))
    return out


KEY = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"


@pytest.mark.parametrize("edit_config,edit_tensors,message", [
    (lambda c: c.update(layer_replication=[[0, 1]], bias="all"), None,
     r"option\(s\) ptune does not support: bias='all', layer_replication=\[\[0, 1\]\]; save the adapter without"),
    (lambda c: c.update(init_lora_weights="pissa", lora_bias=True), None,
     "init_lora_weights='pissa', lora_bias=True; save the adapter without them"),
    (lambda c: c.update(peft_type="BOFT"), None, r"peft_type='BOFT'; ptune loads"),
    (lambda c: c.update(modules_to_save=["wte"]), None, r"modules_to_save \['wte'\]"),
    (lambda c: c.update(task_type="SEQ_2_SEQ_LM"), None, "task_type='SEQ_2_SEQ_LM'"),
    (lambda c: c.update(r=3), None,
     rf"'{KEY}' has shape \(2, 64\), which does not fit ptune's transformer/h_0/attn/c_attn/lora_a of shape \(64, 3\)"),
    (None, lambda t: t.update({KEY.replace("c_attn", "q_proj"): t.pop(KEY)}),
     r"key 'base_model.model.transformer.h.0.attn.q_proj.lora_A.weight' names no lora layer"),
])
def test_load_names_what_does_not_fit(edit_config, edit_tensors, message):
    cfg, _ = _good_adapter()
    with pytest.raises(ValueError, match=message):
        hf_peft.load(_broken(edit_config, edit_tensors), cfg)


def test_load_refuses_truncated_and_mismatched_files():
    cfg, good = _good_adapter()
    broken = _broken()
    weights = broken / hf_peft.ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"{weights}: not a readable safetensors file"):
        hf_peft.load(broken, cfg)
    with pytest.raises(ValueError, match="is not a PEFT adapter directory"):
        hf_peft.load(_TMP, cfg)
    wider = models.model_config("gpt2-tiny", hidden_size=128)
    with pytest.raises(ValueError, match=rf"'{KEY}' has shape \(2, 64\), which does not fit .* \(128, 2\)"):
        hf_peft.load(good, wider)


def test_trained_run_exports_and_merges(make_config, tmp_path):
    """scripts/export.py's core: a run's checkpoint -> PEFT adapter and merged checkpoint, which agree."""
    from ptune.training import builder, train
    config = make_config("lora", steps=3)
    config.optim.learning_rate = 1e-2
    train.train_and_evaluate(config, str(tmp_path / "run"))
    adapter = hf_peft.export_workdir(tmp_path / "run", tmp_path / "peft")
    merged = hf_peft.export_workdir(tmp_path / "run", tmp_path / "merged", merge=True)
    run = builder.setup(config)
    cfg = run.model.config
    base = partition.unflatten({p: x for p, x in partition.flatten(run.params).items() if not hf.is_site(p)})
    base_dir = hf_peft.save_pretrained_merged(tmp_path / "base", base, models.build(cfg))
    with_adapter = peft.PeftModel.from_pretrained(_hf_model(base_dir, cfg), str(adapter)).eval()
    trained_b = with_adapter.base_model.model.transformer.h[0].attn.c_attn.lora_B["default"].weight
    assert float(trained_b.abs().max()) > 0    # trained away from B = 0, so the check below can fail
    assert _max_diff(_torch(with_adapter), _torch(_hf_model(merged, cfg))) < TOL
