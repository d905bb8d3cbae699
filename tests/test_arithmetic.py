"""Adapter arithmetic equals PEFT's `add_weighted_adapter`: random LoRA adapters on tiny models,
exported to PEFT, combined there and in ptune for every combination type, and the results (read back
with hf_peft.load) compared update by update."""

import functools

import flax.linen as nn
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from peft.utils import merge_utils  # noqa: E402
from test_hf_peft import _TMP, TOL, _base, _hf_model, _max_diff, _ptune, _torch  # noqa: E402

from ptune import methods, models, partition  # noqa: E402
from ptune.interop import arithmetic, hf_peft  # noqa: E402
from ptune.interop.arithmetic import LoraAdapter, combine  # noqa: E402

# Three adapters a preset: the second covers fewer modules (a combination covers the union, each
# module combining the adapters that have it); the third has another rank (cat and SVD types only).
ADAPTERS = {
    "gpt2-tiny": [dict(rank=2, alpha=5.0, targets=["c_attn", "mlp.c_proj"]),
                  dict(rank=2, alpha=3.0, targets=["c_attn"]),
                  dict(rank=4, alpha=8.0, targets=["c_attn", "mlp.c_proj"])],
    "llama-tiny": [dict(rank=2, alpha=3.0, rslora=True, targets=["q_proj", "v_proj", "down_proj"]),
                   dict(rank=2, alpha=4.0, rslora=True, targets=["q_proj", "down_proj"]),
                   dict(rank=4, alpha=2.0, rslora=True, targets=["q_proj", "v_proj"])],
}
WEIGHTS = [0.7, -0.4, 0.5]   # a negative weight subtracts
EQUAL_RANKS = arithmetic.FACTOR_WISE
OPTIONS = {"density": 0.5}   # for the pruning types; PEFT's default majority_sign_method="total"


@functools.cache
def _adapter(preset, i) -> tuple[LoraAdapter, str]:
    """(adapter, its PEFT export): LoRA leaves drawn at random, seed i."""
    cfg, base, _ = _base(preset)
    method = methods.get("lora", cfg, **ADAPTERS[preset][i])
    template = partition.flatten(nn.unbox(models.abstract_params(models.build(cfg, method.sites))))
    rng = np.random.default_rng(10 + i)
    trainable = partition.unflatten({p: (0.3 * rng.standard_normal(x.shape)).astype(np.float32)
                                     for p, x in template.items() if p.endswith(("/lora_a", "/lora_b"))})
    out = hf_peft.export(_TMP / f"arithmetic-{preset}-{i}", partition.merge(trainable, base), method, cfg)
    return LoraAdapter.of(method, trainable), str(out)


@functools.cache
def _peft_model(preset):
    """A PeftModel holding the three adapters as a0, a1, a2."""
    cfg, _, base_dir = _base(preset)
    model = peft.PeftModel.from_pretrained(_hf_model(base_dir, cfg), _adapter(preset, 0)[1], adapter_name="a0")
    for i in (1, 2):
        model.load_adapter(_adapter(preset, i)[1], adapter_name=f"a{i}")
    return model.eval()


def _peft_combined(preset, name, n, combination_type, **options) -> LoraAdapter:
    """PEFT's add_weighted_adapter of the first `n` adapters, saved and read back into ptune."""
    cfg = _base(preset)[0]
    model = _peft_model(preset)
    model.add_weighted_adapter([f"a{i}" for i in range(n)], WEIGHTS[:n], name, combination_type, **options)
    out = _TMP / f"peft-{preset}-{name}"
    model.save_pretrained(str(out), selected_adapters=[name])
    return LoraAdapter.of(*hf_peft.load(out / name, cfg))


def _update_diff(ours: LoraAdapter, theirs: LoraAdapter) -> tuple[float, float]:
    """(largest |difference| between the two adapters' updates, largest |entry| of ours)."""
    theirs_deltas = theirs.deltas()
    diff = max(np.abs(d - theirs_deltas[m]).max() for m, d in ours.deltas().items())
    return float(diff), float(max(np.abs(d).max() for d in ours.deltas().values()))


@pytest.fixture
def same_dare_masks(monkeypatch):
    """PEFT draws DARE's masks from torch's global generator: hand it the masks ptune drew for the
    same tensors, found by their values (PEFT holds factors and GPT-2's updates transposed)."""
    drawn, current = [], []
    ptune_prune, peft_prune = arithmetic._random_prune, merge_utils.random_pruning

    def recording(task, density, rng):
        pruned = ptune_prune(task, density, rng)
        drawn.append((task, pruned != 0))
        return pruned

    def mask_for(tensor):
        t = tensor.numpy()
        for task, keep in drawn:
            for orient in (np.transpose, np.asarray):
                if orient(t).shape == task.shape and np.allclose(orient(t), task, atol=1e-6):
                    return torch.from_numpy(orient(keep).astype(np.float32))
        raise AssertionError(f"PEFT prunes a {t.shape} tensor ptune did not")

    monkeypatch.setattr(arithmetic, "_random_prune", recording)
    monkeypatch.setattr(merge_utils, "random_pruning",
                        lambda tensor, density, rescale: current.append(tensor) or peft_prune(tensor, density, rescale))
    monkeypatch.setattr(torch, "bernoulli", lambda probabilities: mask_for(current[-1]))
    return drawn


# Every type on GPT-2 (Conv1D layers, stored (in, out)); one of each family on LLaMA (rsLoRA).
CASES = [("gpt2-tiny", t) for t in arithmetic.COMBINATION_TYPES] + [
    ("llama-tiny", t) for t in ("linear", "dare_ties", "cat", "svd", "dare_ties_svd")]


@pytest.mark.parametrize("preset,combination_type", CASES)
def test_combination_equals_peft(preset, combination_type, same_dare_masks):
    n = 2 if combination_type in EQUAL_RANKS else 3
    options = OPTIONS if combination_type.startswith(("ties", "dare", "magnitude")) else {}
    ours = combine([_adapter(preset, i)[0] for i in range(n)], WEIGHTS[:n], combination_type, **options)
    theirs = _peft_combined(preset, combination_type, n, combination_type, **options)
    assert ours.options == theirs.options   # rank, alpha = rank, rslora, the union of the targets
    assert set(ours.options["targets"]) > set(_adapter(preset, 1)[0].options["targets"])
    diff, size = _update_diff(ours, theirs)
    print(f"{preset} {combination_type}: rank {ours.rank}, max |update diff| {diff:.1e} (max |update| {size:.1f})")
    # PEFT's SVD runs in float32 and truncates: a few float32 ulps of the update's size apart (a
    # float64 SVD here does not come closer); the other types agree to float32 rounding.
    assert diff < 1e-5 * (size if combination_type in arithmetic.SVD_BASED else 1)
    if combination_type.startswith("dare"):
        assert same_dare_masks   # the masks were shared, not skipped
    if combination_type not in arithmetic.SVD_BASED:   # factors are unique, unlike singular vectors' signs
        ours_flat, theirs_flat = partition.flatten(ours.params), partition.flatten(theirs.params)
        assert max(np.abs(x - theirs_flat[p]).max() for p, x in ours_flat.items()) < 1e-5


@pytest.fixture
def same_svd_signs(monkeypatch):
    """Singular vectors' signs are the LAPACK build's choice (torch's MKL and numpy's OpenBLAS differ),
    and svd_clamp's quantile depends on them: give PEFT's SVD ptune's signs (each A row's largest
    entry positive; PEFT's A is ptune's transposed)."""
    svd = torch.linalg.svd

    def with_ptune_signs(matrix, full_matrices=True, driver=None):
        u, singular, vh = svd(matrix, full_matrices=full_matrices, driver=driver)
        k = len(singular)
        flip = torch.sign(vh[:k].gather(1, vh[:k].abs().argmax(1, keepdim=True)))[:, 0]
        return torch.cat([u[:, :k] * flip, u[:, k:]], 1), singular, torch.cat([vh[:k] * flip[:, None], vh[k:]])

    monkeypatch.setattr(torch.linalg, "svd", with_ptune_signs)


@pytest.mark.parametrize("combination_type,options", [
    ("svd", dict(svd_rank=3, svd_clamp=0.9)), ("ties", dict(density=0.3, majority_sign_method="frequency")),
    ("magnitude_prune_svd", dict(density=0.7, svd_rank=1))])
def test_options_equal_peft(combination_type, options, same_svd_signs):
    n = 2 if combination_type in EQUAL_RANKS else 3
    ours = combine([_adapter("gpt2-tiny", i)[0] for i in range(n)], WEIGHTS[:n], combination_type, **options)
    theirs = _peft_combined("gpt2-tiny", f"{combination_type}-options", n, combination_type, **options)
    assert ours.rank == theirs.rank == options.get("svd_rank", 2)
    diff, size = _update_diff(ours, theirs)
    assert diff < 1e-5 * (size if combination_type in arithmetic.SVD_BASED else 1)
    if "svd_clamp" in options:   # and the clamp clamped
        unclamped = combine([_adapter("gpt2-tiny", i)[0] for i in range(n)], WEIGHTS[:n], "svd", svd_rank=3)
        assert _update_diff(ours, unclamped)[0] > 1e-2


def test_combined_adapter_runs_in_ptune_as_in_peft():
    """The result is a ptune LoRA adapter: its options build the method, its params are the sites."""
    cfg, base, _ = _base("gpt2-tiny")
    mixed = combine([_adapter("gpt2-tiny", i)[0] for i in range(3)], WEIGHTS, "cat")
    _peft_combined("gpt2-tiny", "cat-run", 3, "cat")
    method = methods.get("lora", cfg, **mixed.options)
    model = _peft_model("gpt2-tiny")
    model.set_adapter("cat-run")
    diff = _max_diff(_ptune(cfg, models.build(cfg, method.sites), partition.merge(mixed.params, base)), _torch(model))
    print(f"cat of 3 adapters, ptune vs PEFT: max |logit diff| {diff:.2e}")
    assert diff < TOL


def test_dare_keeps_density_and_rescales():
    rng = np.random.default_rng(0)
    draw = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    one = LoraAdapter({"m": {"lora_a": draw(512, 4), "lora_b": draw(4, 256)}}, alpha=4.0)   # scale 1
    other = LoraAdapter({"m": {"lora_a": draw(512, 4), "lora_b": draw(4, 256)}}, alpha=4.0)
    mixed = combine([one, other], [1.0, 0.0], "dare_linear", density=0.3, seed=1)
    a, b = mixed.params["m"]["lora_a"], mixed.params["m"]["lora_b"]
    for got, source in ((a, one.params["m"]["lora_a"]), (b, one.params["m"]["lora_b"])):
        kept = got != 0
        assert abs(kept.mean() - 0.3) < 0.04
        np.testing.assert_allclose(got[kept], source[kept] / 0.3, rtol=1e-6)
    again = combine([one, other], [1.0, 0.0], "dare_linear", density=0.3, seed=1).params["m"]["lora_a"]
    reseeded = combine([one, other], [1.0, 0.0], "dare_linear", density=0.3, seed=2).params["m"]["lora_a"]
    assert np.array_equal(again, a) and not np.array_equal(reseeded, a)


def _small(rank=2, module="m", d_in=6, d_out=5, alpha=2.0):
    rng = np.random.default_rng(rank)
    return LoraAdapter({module: {"lora_a": rng.standard_normal((d_in, rank)),
                                 "lora_b": rng.standard_normal((rank, d_out))}}, alpha=alpha)


@pytest.mark.parametrize("call,match", [
    (lambda: combine([_small(2), _small(3)], [1, 1], "linear"), r"need one rank, and theirs are \[2, 3\]; use 'cat'"),
    (lambda: combine([_small(), _small()], [1.0], "cat"), r"weights=\[1.0\] must be 2 finite numbers"),
    (lambda: combine([_small(), _small()], [1, 1], "ties"), r"density=None; 'ties' needs the fraction"),
    (lambda: combine([_small(), _small()], [1, 1], "dare_ties", density=0.0), r"density=0.0.*in \(0, 1\]"),
    (lambda: combine([_small(), _small()], [1, 1], "svd", density=1.5), r"density=1.5 must be in \(0, 1\]"),
    (lambda: combine([_small(), _small(d_out=7)], [1, 1], "cat"), "at 'm' adapter 0 maps 6 -> 5 features and "
                                                                  "adapter 1 6 -> 7.*different base models"),
    (lambda: combine([_small(), _small()], [1, 1], "svd", svd_rank=6), r"svd_rank=6 exceeds.*svd_rank <= 5"),
    (lambda: combine([_small(), _small()], [1, 1], "mean"), r"combination_type='mean'; choose one of"),
    (lambda: combine([_small(), _small()], [1, 1], "ties", density=0.5, majority_sign_method="vote"),
     "majority_sign_method='vote'"),
    (lambda: LoraAdapter({"m": {"lora_a": np.ones((4, 2))}, "score": {"kernel": np.ones((4, 2))}}, 1.0),
     r"the leaf 'score/kernel', which is not one.*task heads"),
    (lambda: LoraAdapter({"m": {"lora_a": np.ones((4, 2))}}, 1.0), "lora_a \\(4, 2\\) and lora_b missing"),
    (lambda: LoraAdapter.of(methods.get("ia3", models.model_config("gpt2-tiny")), {}), "has no LoRA sites"),
])
def test_bad_input_names_the_culprit(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_single_adapter_is_scaled_linearly():
    """As in PEFT, one adapter is combined 'linear' whatever the type: its update times the weight."""
    adapter = _small(3, alpha=6.0)
    for combination_type in ("ties", "svd", "cat"):
        mixed = combine([adapter], [0.5], combination_type, density=0.2)
        assert mixed.rank == 3 and mixed.scale == 1.0
        np.testing.assert_allclose(mixed.deltas()["m"], 0.5 * adapter.deltas()["m"], rtol=1e-5, atol=1e-6)
