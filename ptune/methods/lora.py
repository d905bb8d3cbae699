"""LoRA (Hu et al., 2021): W x + (alpha / r) B A x on the target layers, B = 0 at init.

`rslora` scales by alpha / sqrt(r) (Kalajdzievski, 2023); `lr_ratio_b` > 1 gives B
its own optimizer group with that learning-rate multiple (LoRA+, Hayou et al., 2024).

`init` (PEFT's init_lora_weights): "random" (A as torch.nn.Linear, B = 0); "pissa" (Meng et al.,
2024): A, B from the top-r singular triplets of W; "pissa_niter_K": the same by a randomised SVD
with K subspace iterations; "olora" (Büyükakyüz, 2024): from W = QR. The layer still starts as the
base: the initial factors are subtracted (see ptune.models.sites.lora).
"""

import re

import jax
import jax.numpy as jnp

from ptune import partition
from ptune.errors import UserError
from ptune.methods.base import Method, module_names, number, positive_int
from ptune.models.sites import KINDS, LoRA, Sites, targets_regex

INITS = ("random", "pissa", "pissa_niter_<K>", "olora")


def make(model_config, rank: int = 8, alpha: float = 16.0, targets=None, rslora: bool = False,
         dropout: float = 0.0, lr_ratio_b: float = 1.0, init: str = "random") -> Method:
    lr_ratio_b = number("lora", "lr_ratio_b", lr_ratio_b, lambda v: v >= 1, ">= 1")
    spec = lora_spec("lora", model_config, rank, alpha, targets, rslora, dropout, init)
    initializer = from_base_initializer("lora", init, spec)
    if lr_ratio_b == 1:
        return Method("lora", Sites(lora=spec), rules=[(r"/lora_[ab]$", "lora")], init=initializer)
    return Method("lora", Sites(lora=spec), rules=[(r"/lora_a$", "lora"), (r"/lora_b$", "lora_b")],
                  optim={"lora_b": {"lr_scale": float(lr_ratio_b)}}, init=initializer)


def lora_spec(method: str, model_config, rank, alpha, targets, rslora, dropout, init) -> LoRA:
    """The LoRA spec of a LoRA-family method's options (checked; the errors name `method`)."""
    positive_int(method, "rank", rank)
    alpha = number(method, "alpha", alpha, lambda v: v > 0, "> 0")
    dropout = number(method, "dropout", dropout, lambda v: 0 <= v < 1, "in [0, 1)")
    if not (isinstance(init, str) and re.fullmatch(r"random|pissa|pissa_niter_\d+|olora", init)):
        raise UserError(f"method {method}: init={init!r}; choose one of {INITS} (PEFT's init_lora_weights)")
    defaults = KINDS[method].defaults_for(model_config.family, model_config.model_type)
    targets = targets_regex(module_names(method, "targets", targets) or defaults["targets"])
    return LoRA(rank, alpha, targets, rslora, dropout, from_base=init != "random")


def from_base_initializer(kind_name: str, init: str, spec: LoRA):
    """Method.init for a `from_base` spec of the LoRA-family kind `kind_name`: every targeted layer's A, B and
    their frozen copies A0, B0 set to the factors of its kernel that `init` names; None for "random"."""
    if not spec.from_base:
        return None
    kind = KINDS[kind_name]

    def initialize(params, ctx):
        flat = partition.flatten(params)
        for i, path in enumerate([p for p in flat if p.endswith(f"/{kind.a}0")]):
            module = path.rpartition("/")[0]
            kernel = flat[f"{module}/kernel"]
            a, b = factorize(init, kernel, spec.rank, spec.scale, jax.random.fold_in(ctx.rng, i))
            for name, x in ((kind.a, a), (kind.b, b), (kind.a + "0", a), (kind.b + "0", b)):
                # A copy each: the train step donates the trainable buffers, never the frozen ones.
                flat[f"{module}/{name}"] = jnp.array(x, flat[f"{module}/{name}"].dtype, copy=True)
        return partition.unflatten(flat)
    return initialize


def factorize(init: str, kernel, rank: int, scale: float, rng):
    """(A (in, r), B (r, out)) of an (in, out) kernel, as PEFT computes them on W = kernel.T (out, in) in
    float32: PiSSA, scale * A B = W's top-r SVD part; OLoRA, A B = Q_r R_r of W = QR."""
    w = jnp.asarray(kernel, jnp.float32).T
    if init == "olora":
        q, r = jnp.linalg.qr(w)
        return r[:rank].T, q[:, :rank].T
    if init == "pissa":
        u, s, vh = jnp.linalg.svd(w, full_matrices=False)
    else:
        u, s, vh = svd_lowrank(w, rank, int(init.rpartition("_")[2]), rng)
    root = jnp.sqrt(s[:rank] / scale)
    return (root[:, None] * vh[:rank]).T, (u[:, :rank] * root).T


def svd_lowrank(w, rank: int, niter: int, rng):
    """(U, S, Vh) of rank `rank` approximating w, by randomised subspace iteration (Halko et al., 2011,
    Algorithm 4.4, without oversampling, as torch.svd_lowrank(w, q=rank, niter))."""
    basis = lambda x: jnp.linalg.qr(x)[0]
    q = basis(w @ jax.random.normal(rng, (w.shape[1], rank), w.dtype))
    for _ in range(niter):
        q = basis(w @ basis(w.T @ q))
    u, s, vh = jnp.linalg.svd(q.T @ w, full_matrices=False)
    return q @ u, s, vh
