"""P-tuning and LN tuning against PEFT: ptune's prompt encoder computes what PEFT's does, and adapters go
both ways with matching logits (tiny random models and test_hf_peft's helpers)."""

import flax.linen as nn
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import test_hf_peft as interop  # noqa: E402  (tiny bases, PEFT models and logit comparisons)

from ptune import methods, models, partition  # noqa: E402
from ptune.interop import hf_peft  # noqa: E402
from ptune.models import hf, pretrained  # noqa: E402
from ptune.models.sites.ptuning import PromptEncoder, PTuning  # noqa: E402


def _from_torch(encoder, spec: PTuning) -> dict:
    """ptune's leaves for PEFT's PromptEncoder `encoder` (torch's (out, in) weights transposed)."""
    w = {n: p.detach().numpy() for n, p in encoder.named_parameters()}
    out = {"embedding": w["embedding.weight"]}
    for k in range(3 if spec.encoder == "mlp" else 2):   # mlp_head.0, .2, .4: the Linear layers between ReLUs
        out[f"mlp_{k}"] = {"kernel": w[f"mlp_head.{2 * k}.weight"].T, "bias": w[f"mlp_head.{2 * k}.bias"]}
    for k in range(spec.layers if spec.encoder == "lstm" else 0):
        for sfx in ("", "_reverse"):   # the two directions
            out[f"lstm_{k}{sfx}"] = {"w_ih": w[f"lstm_head.weight_ih_l{k}{sfx}"].T,
                                     "w_hh": w[f"lstm_head.weight_hh_l{k}{sfx}"].T,
                                     "b_ih": w[f"lstm_head.bias_ih_l{k}{sfx}"], "b_hh": w[f"lstm_head.bias_hh_l{k}{sfx}"]}
    return out


@pytest.mark.parametrize("spec", [PTuning(5, "mlp", 24), PTuning(5, "lstm", 12, 1), PTuning(5, "lstm", 12, 3)])
def test_encoder_computes_what_peft_saves(spec):
    """PEFT's encoder at its PyTorch init, weights copied over: the same leaves and the same prompt."""
    d = 32
    torch.manual_seed(0)
    encoder = peft.PromptEncoder(peft.PromptEncoderConfig(
        num_virtual_tokens=spec.length, token_dim=d, encoder_hidden_size=spec.hidden, encoder_num_layers=spec.layers,
        encoder_reparameterization_type=spec.encoder.upper(), num_transformer_submodules=1, num_layers=1,
        num_attention_heads=1)).eval()
    with torch.no_grad():
        want = encoder(torch.arange(spec.length)[None])[0].numpy()
    module = PromptEncoder(spec, d)
    theirs = _from_torch(encoder, spec)
    shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)
    assert shapes(nn.unbox(jax.eval_shape(module.init, jax.random.key(0))["params"])) == shapes(theirs)
    got = module.apply({"params": theirs})
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert np.abs(want).max() > 0.05   # a prompt that could be wrong


EXPORTS = [("gpt2-tiny", "ptuning", dict(length=3, hidden=16)),
           ("llama-tiny", "ptuning", dict(length=3, encoder="lstm", hidden=16, layers=1)),
           ("bert-tiny", "ptuning", dict(length=3, encoder="lstm", hidden=16)),
           ("gpt2-tiny", "ln_tuning", dict(targets=["h_1/ln_1", "ln_2"])),
           ("llama-tiny", "ln_tuning", {}), ("bert-tiny", "ln_tuning", {})]


def _trained(preset, name, options):
    """(config, method, model, params): a tiny base with every trained leaf drawn at random."""
    cfg, _, _ = interop._base(preset)
    method = methods.get(name, cfg, **options)
    method = methods.compose(method, methods.get("head", cfg)) if cfg.num_labels else method
    model = models.build(cfg, method.sites)
    params = nn.unbox(model.init(jax.random.key(0), interop.IDS, output="hidden")["params"])
    _, frozen = partition.split(params, method.labels(params))
    return cfg, method, model, partition.merge(frozen, interop._random_trainable(params, method))


@pytest.mark.parametrize("preset,name,options", EXPORTS)
def test_export_loads_in_peft_with_matching_logits(preset, name, options):
    cfg, method, model, params = _trained(preset, name, options)
    out = hf_peft.export(interop._TMP / f"export-{preset}-{name}", params, method, cfg, base_name="tiny")
    reference = peft.PeftModel.from_pretrained(interop._hf_model(interop._base(preset)[2], cfg), str(out)).eval()
    diff = interop._max_diff(interop._ptune(cfg, model, params), interop._torch(reference))
    print(f"export {preset} {name}: max |logit diff| {diff:.2e}")
    assert diff < interop.TOL
    config = reference.peft_config["default"]
    if name == "ptuning":
        assert (config.peft_type, config.encoder_reparameterization_type, config.encoder_hidden_size,
                config.token_dim) == ("P_TUNING", options.get("encoder", "mlp").upper(), 16, cfg.hidden_size)
        return
    # PEFT made copies of exactly the norm layers ptune trained.
    copies = {n.removeprefix("base_model.model.").removesuffix(".ln_tuning_layers.default")
              for n, _ in reference.named_modules() if n.endswith(".ln_tuning_layers.default")}
    trained = {hf.hf_module(p.rpartition("/")[0]) for p, g in partition.flatten(method.labels(params)).items()
               if g == "ln_tuning"}
    assert copies == trained and len(trained) == {"gpt2-tiny": 3, "llama-tiny": 5, "bert-tiny": 5}[preset]
    if preset == "gpt2-tiny":
        assert sorted(config.target_modules) == ["h.1.ln_1", "ln_2"]


IMPORTS = {"ptuning": lambda task, preset: peft.PromptEncoderConfig(
               task_type=task, num_virtual_tokens=3, encoder_hidden_size=16,
               encoder_reparameterization_type="MLP" if preset == "gpt2-tiny" else "LSTM"),
           "ln_tuning": lambda task, preset: peft.LNTuningConfig(
               task_type=task, target_modules={"gpt2-tiny": ["ln_1"], "bert-tiny": ["LayerNorm"]}.get(preset))}


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny", "bert-tiny"])
@pytest.mark.parametrize("name", ["ptuning", "ln_tuning"])
def test_peft_adapter_imports_with_matching_logits(monkeypatch, preset, name):
    """A PEFT P_TUNING adapter is its folded prompt, so it loads as prompt tuning; LN_TUNING as ln_tuning."""
    monkeypatch.setitem(interop.PEFT_CONFIGS, name, IMPORTS[name])
    cfg, _, base_dir = interop._base(preset)
    want, adapter = interop._peft_adapter(preset, name)
    method, trainable = hf_peft.load(adapter, cfg)
    assert method.name.split("+")[0] == {"ptuning": "prompt", "ln_tuning": "ln_tuning"}[name]
    if (preset, name) == ("gpt2-tiny", "ln_tuning"):   # made with target_modules=["ln_1"]
        assert sorted(partition.flatten(trainable)) == [f"transformer/h_{i}/ln_1/{leaf}"
                                                        for i in (0, 1) for leaf in ("bias", "scale")]
    model = models.build(cfg, method.sites)
    _, state = pretrained.read_hf_dir(base_dir)
    template = hf.from_hf(cfg.family, state, nn.unbox(models.abstract_params(model)))
    _, frozen = partition.split(template, method.labels(template))
    diff = interop._max_diff(interop._ptune(cfg, model, partition.merge(trainable, frozen)), want)
    print(f"import {preset} {name}: max |logit diff| {diff:.2e}")
    assert diff < interop.TOL


def test_export_refuses_norms_beside_other_base_weights():
    """BitFit trains the norms' biases and the linear layers' too, and LN tuning + LoRA is two PEFT types:
    neither is one PEFT adapter."""
    cfg, method, params = interop._abstract("gpt2-tiny", "bitfit")
    with pytest.raises(ValueError, match="has no sites"):
        hf_peft.export(interop._TMP / "refused-bitfit", params, method, cfg)
    method = methods.compose(methods.get("ln_tuning", cfg), methods.get("lora", cfg))
    params = nn.unbox(models.abstract_params(models.build(cfg, method.sites)))
    with pytest.raises(ValueError, match=r"trains base weights \(e.g. transformer/h_0/ln_1/bias\)"):
        hf_peft.export(interop._TMP / "refused-ln-lora", params, method, cfg)


@pytest.mark.slow
@pytest.mark.parametrize("name,options", [("ptuning", dict(encoder="lstm", hidden=8, length=4)),
                                          ("ln_tuning", {})])
def test_trained_run_exports_what_it_trained(make_config, tmp_path, name, options):
    """--config.method.name=ptuning / ln_tuning through the training loop; the run's adapter exports (the
    encoder folded) and reads back as the run's trained prompt or norms."""
    from ptune.training import builder, checkpoint, train
    config = make_config(name, steps=2, **options)
    config.optim.learning_rate = 1e-2
    train.train_and_evaluate(config, str(tmp_path / "run"))
    _, trained, _ = checkpoint.load_adapter(tmp_path / "run")
    run = builder.setup(config, training=False)
    params = partition.merge(trained, partition.split(run.params, run.labels)[1])
    changed = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                           trained, partition.split(run.params, run.labels)[0])
    assert min(jax.tree.leaves(changed)) > 0   # every trained leaf moved
    method, loaded = hf_peft.load(hf_peft.export_workdir(tmp_path / "run", tmp_path / "peft"), run.model.config)
    if name == "ptuning":   # a P_TUNING adapter is the folded prompt, which loads as prompt tuning
        loaded, trained = loaded["prompt"], run.method.folded(params, run.model)[0]["ptuning"]
    jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, atol=1e-6, rtol=0), loaded, trained)
