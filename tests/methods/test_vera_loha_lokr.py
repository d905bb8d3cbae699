"""VeRA, LoHa and LoKr: trainable counts by closed form on real shapes (and the papers' numbers),
the identity at init, merging, the bank, sharding, bad options and the launcher.
PEFT interop is in tests/test_hf_peft_vera_loha_lokr.py."""

import flax.linen as nn
import jax
import numpy as np
import pytest
import test_bank  # a random base, the mixed-batch-equals-each-task-alone check
from jax.sharding import AbstractMesh, PartitionSpec
from test_counts import count  # noqa: F401  (a fixture)
from test_counts import REAL, backbone, head, lora_shapes

from ptune import config as config_lib
from ptune import methods, models, partition, sharding
from ptune.inference import bank as bank_lib
from ptune.interop import hf_peft
from ptune.models import sites

# PEFT's lokr.layer.factorization of the dimensions below (checked against PEFT's own function there).
FACTORS = {576: (24, 24), 192: (12, 16), 768: (24, 32), 2304: (48, 48)}


def lokr_layer(i, o, r, both=False):
    """LoKr's parameters on one (in i, out o) layer: each Kronecker factor full, or two rank-r factors
    when r < max(its sides) / 2 (W1 only with decompose_both)."""
    (c, d), (a, b) = FACTORS[i], FACTORS[o]
    w1 = r * (c + a) if both and r < max(a, c) / 2 else c * a
    w2 = r * (d + b) if r < max(b, d) / 2 else d * b
    return w1 + w2


@pytest.mark.parametrize("preset", REAL)
def test_vera_counts(count, preset):
    cfg, c = count(preset, "vera", rank=64)
    shapes, L = lora_shapes(cfg), cfg.num_layers
    assert c["vera"] == L * sum(64 + o for _, o in shapes)                      # lambda_d, lambda_b
    # Each layer also holds its slices of the shared projections, frozen: A (in, r), B (r, out).
    assert c[partition.FROZEN] == backbone(cfg) + head(cfg) + L * sum(64 * (i + o) for i, o in shapes)


@pytest.mark.parametrize("preset", REAL)
def test_loha_and_lokr_counts(count, preset):
    cfg, c = count(preset, "loha", rank=4)
    shapes, L = lora_shapes(cfg), cfg.num_layers
    assert c == {"loha": L * sum(2 * 4 * (i + o) for i, o in shapes), partition.FROZEN: backbone(cfg) + head(cfg)}
    for options in (dict(rank=8), dict(rank=2, decompose_both=True)):
        cfg, c = count(preset, "lokr", **options)
        want = L * sum(lokr_layer(i, o, options["rank"], options.get("decompose_both", False)) for i, o in shapes)
        assert c == {"lokr": want, partition.FROZEN: backbone(cfg) + head(cfg)}, options


def test_literal_counts(count):
    # VeRA paper, RoBERTa-base (BERT-base shapes), query and value, r = 1024: 43K.
    assert count("bert-base", "vera", rank=1024)[1]["vera"] == 12 * 2 * (1024 + 768) == 43_008
    assert count("bert-base", "loha", rank=8)[1]["loha"] == 12 * 2 * 2 * 8 * (768 + 768) == 589_824
    # 768 = 24 x 32: W1 (24, 24) full; W2 (32, 32) as two rank-8 factors; decompose_both splits W1 too.
    assert count("bert-base", "lokr", rank=8)[1]["lokr"] == 12 * 2 * (24 * 24 + 8 * 64) == 26_112
    assert count("bert-base", "lokr", rank=8, decompose_both=True)[1]["lokr"] == 12 * 2 * (8 * 48 + 8 * 64)
    # GPT-2's c_attn, 768 -> 2304 = 48 x 48: W1 (24, 48) full, W2 (32, 48) rank 8.
    assert count("gpt2", "lokr")[1]["lokr"] == 12 * (24 * 48 + 8 * (32 + 48)) == 21_504


CASES = [("gpt2-tiny", "vera", dict(rank=4, projection_seed=5)), ("llama-tiny", "loha", dict(rank=2, alpha=3.0)),
         ("bert-tiny", "lokr", dict(rank=1, alpha=2.0, decompose_both=True, decompose_factor=4))]
IDS = np.array([[11, 12, 13, 14, 15, 16], [17, 18, 19, 20, 21, 22]])


@pytest.mark.parametrize("preset,name,options", CASES)
def test_identity_at_init_then_merges_into_the_kernels(tiny, preset, name, options):
    cfg = models.model_config(preset)
    method = methods.get(name, cfg, **options)
    cfg, model, params = tiny(preset, method.sites)
    plain = models.build(cfg)
    before = plain.apply({"params": partition.unflatten({p: x for p, x in partition.flatten(params).items()
                                                         if not sites.is_site(p)})}, IDS, output="hidden")
    np.testing.assert_array_equal(model.apply({"params": params}, IDS, output="hidden"), before)
    trainable, frozen = partition.split(params, method.labels(params))
    rng = np.random.default_rng(0)
    moved = jax.tree.map(lambda x: x + 0.3 * rng.standard_normal(x.shape).astype(np.float32), trainable)
    params = partition.merge(moved, frozen)
    merged, left = hf_peft.merge(params, model)
    assert left == models.Sites() and not any(sites.is_site(p) for p in partition.flatten(merged))
    want = model.apply({"params": params}, IDS, output="hidden")
    assert float(np.abs(want - before).max()) > 1e-2   # the moved sites change the output
    np.testing.assert_allclose(plain.apply({"params": merged}, IDS, output="hidden"), want, atol=1e-5, rtol=0)


def test_vera_projections_are_shared_by_layers_and_fixed_by_the_seed(tiny):
    cfg = models.model_config("llama-tiny")
    spec = methods.get("vera", cfg, rank=4).sites.vera
    assert spec.projection == (64, 64)          # q_proj 64 -> 64, v_proj 64 -> 32
    _, _, params = tiny("llama-tiny", models.Sites(vera=spec))
    flat = partition.flatten(params)
    a, b = sites.vera.projections(0, 4, (64, 64))
    for layer in ("model/layers_0/self_attn/q_proj", "model/layers_1/self_attn/v_proj"):
        np.testing.assert_array_equal(flat[f"{layer}/vera_a"], a.T)
        np.testing.assert_array_equal(flat[f"{layer}/vera_b"], b[: flat[f"{layer}/vera_lambda_b"].shape[0]].T)
    assert not np.array_equal(sites.vera.projections(1, 4, (64, 64))[0], a)


def _trained(cfg, base, name, seed, **options):
    """(model, method, params): `name` on the shared base, trainable leaves moved away from their init."""
    method = methods.get(name, cfg, **options)
    model = models.build(cfg, method.sites)
    params = models.init(model, jax.random.key(0), pretrained=base)   # VeRA's frozen projections included
    trainable, frozen = partition.split(params, method.labels(params))
    rng = np.random.default_rng(seed)
    trainable = jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(np.float32), trainable)
    return model, method, partition.merge(trainable, frozen)


@pytest.mark.slow
def test_tasks_serve_in_one_bank(monkeypatch):
    """VeRA tasks sharing projections, LoHa tasks of different ranks, alphas and targets, and LoKr, in
    one mixed batch, each row as its task's own model computes it."""
    monkeypatch.setattr(test_bank, "_trained", _trained)
    cfg, base = test_bank._base("gpt2-tiny")
    runs, adapters = test_bank._tasks(cfg, base, {
        "vera": ("vera", {"rank": 4}, (65, 66)), "vera2": ("vera", {"rank": 4, "d_initial": 1.0}, (67, 68, 69)),
        "loha2": ("loha", {"rank": 2, "alpha": 4.0}, (70, 71)),
        "loha4_mlp": ("loha", {"rank": 4, "alpha": 12.0, "targets": ["c_fc"]}, (72, 73)),
        "lokr": ("lokr", {"rank": 2, "decompose_both": True}, (74, 75))})
    bank = bank_lib.Bank(cfg, base, adapters, capacity=6)
    assert bank.sites.names() == ["vera", "loha", "lokr"] and bank.sites.loha.rank == 4
    test_bank._check_mixed_batch(bank, runs, ["vera", "loha2", "vera2", "lokr", "loha4_mlp", "loha2"],
                                 test_bank.PROMPTS + [[22, 23]])


@pytest.mark.parametrize("name,first,second,field", [
    ("vera", dict(rank=4), dict(rank=8), "rank"),
    ("vera", dict(rank=4), dict(rank=4, projection_seed=1), "seed"),
    ("vera", dict(rank=4), dict(rank=4, targets=["c_fc"]), "projection"),   # c_fc is 64 -> 256, c_attn 64 -> 192
    ("lokr", dict(rank=4), dict(rank=2), "rank"),
])
def test_tasks_that_cannot_share_a_bank(name, first, second, field):
    cfg = models.model_config("gpt2-tiny")
    tasks = {"a": methods.get(name, cfg, **first).sites, "b": methods.get(name, cfg, **second).sites}
    with pytest.raises(ValueError, match=rf"tasks' {name} sites have different {field} .*bank these tasks separately"):
        bank_lib.envelope(tasks)


def test_sites_are_replicated_on_a_sharded_mesh():
    cfg, config = models.model_config("llama-tiny"), config_lib.base_config()
    method = methods.compose(*(methods.get(n, cfg, targets=t) for n, t in
                               [("vera", ["q_proj"]), ("loha", ["k_proj"]), ("lokr", ["v_proj"])]))
    boxed = models.abstract_params(models.build(cfg, method.sites))
    shardings = sharding.param_shardings(nn.unbox(boxed), boxed, AbstractMesh((1, 2, 2), sharding.AXES), config.mesh)
    specs = {p: s.spec for p, s in partition.flatten(shardings).items()}
    own = [p for p in specs if sites.is_site(p)]
    assert len(own) == 2 * (4 + 4 + 2) and all(specs[p] == PartitionSpec() for p in own)
    assert specs["model/layers_0/self_attn/q_proj/kernel"] != PartitionSpec()   # the base is sharded


@pytest.mark.parametrize("name,options,message", [
    ("vera", dict(d_initial=0), r"d_initial=0 must be nonzero \(lambda_b starts at 0"),
    ("vera", dict(projection_seed=-1), r"projection_seed=-1 must be an integer in \[0, 2\*\*32\)"),
    ("vera", dict(rank=0), "rank=0 must be a positive integer"),
    ("vera", dict(targets=["nope"]), r"method vera: targets .*nope.* match no layer of this gpt2 model"),
    ("vera", dict(dropout=1.0), r"dropout=1.0 must be in \[0, 1\)"),
    ("loha", dict(alpha=0), "method loha: alpha=0 must be > 0"),
    ("lokr", dict(decompose_factor=0), r"decompose_factor=0 must be a positive integer, or -1 \(each side"),
    ("lokr", dict(decompose_both="yes"), "decompose_both='yes' must be true or false"),
    ("lokr", dict(rnk=4), r"method 'lokr' has no option\(s\) \['rnk'\]"),
])
def test_bad_options_name_the_option_and_the_fix(name, options, message):
    with pytest.raises(ValueError, match=message):
        methods.get(name, models.model_config("gpt2-tiny"), **options)


@pytest.mark.parametrize("name", ["vera", "loha", "lokr"])
def test_the_launcher_config_builds_the_method(name):
    config = config_lib.with_method(config_lib.base_config(), name)
    config.method.rank = 2
    method = methods.from_config(config.method, models.model_config("smollm2-135m"))
    assert method.name == name and getattr(method.sites, name).rank == 2


@pytest.mark.slow
def test_vera_trains_from_the_launcher_config_and_exports(make_config, tmp_path):
    """A run trains lambda_d and lambda_b only; its checkpoint exports (the frozen projections are
    redrawn from the spec when the run is set up again) and loads back as the same adapter."""
    from ptune.training import checkpoint, train
    config = make_config("vera", rank=4, steps=3)
    config.optim.learning_rate = 1e-2
    train.train_and_evaluate(config, str(tmp_path / "run"))
    trained = partition.flatten(checkpoint.load_adapter(str(tmp_path / "run"))[1])
    assert sorted({p.rpartition("/")[2] for p in trained}) == ["vera_lambda_b", "vera_lambda_d"]
    assert min(float(np.abs(x).max()) for p, x in trained.items() if p.endswith("lambda_b")) > 0   # moved from 0
    out = hf_peft.export_workdir(tmp_path / "run", tmp_path / "peft")
    _, loaded = hf_peft.load(out, models.model_config("gpt2-tiny"))
    for path, x in partition.flatten(loaded).items():
        np.testing.assert_array_equal(x, trained[path])
