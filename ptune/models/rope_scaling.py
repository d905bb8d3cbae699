"""RoPE frequency scaling as transformers computes it (`modeling_rope_utils`), for the rope
types ptune implements: the inverse frequencies and the factor on cos/sin.

A ModelConfig holds the scaling as sorted (key, value) pairs of HF's `rope_parameters` without
`rope_theta` (which is `ModelConfig.rope_theta`); () is the default, unscaled RoPE. The
frequencies are computed once, in numpy, when the model is traced.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from ptune.errors import UserError

# rope_type -> (required, optional) parameters besides rope_type and rope_theta.
TYPES = {"default": ((), ()),
         "linear": (("factor",), ()),
         "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), ()),
         "yarn": (("factor", "original_max_position_embeddings"),
                  ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"))}
# Not implemented, and why: both depend on the sequence length, not only on the position, so no
# fixed frequencies reproduce them. transformers recomputes 'dynamic' (NTK) from the longest
# sequence in each batch and keeps cached keys at the frequencies of the step that made them;
# 'longrope' switches frequency sets past original_max_position_embeddings.
REFUSED = {"dynamic": "NTK scaling recomputed from each batch's sequence length",
           "longrope": "switches frequency sets with the sequence length"}


def normalise(scaling) -> tuple:
    """Sorted (key, value) pairs from a dict or pairs (config files give lists); () for default."""
    items = dict(scaling.items() if isinstance(scaling, dict) else (tuple(p) for p in scaling))
    if items.get("rope_type", "default") == "default" and set(items) <= {"rope_type"}:
        return ()
    check(items)
    return tuple(sorted(items.items()))


def check(params: dict) -> None:
    """UserError naming the rope type or parameter ptune does not implement."""
    rope_type = params.get("rope_type")
    if rope_type in REFUSED:
        raise UserError(f"rope_type {rope_type!r} ({REFUSED[rope_type]}) is not implemented; ptune implements "
                        f"rope_type {sorted(TYPES)}")
    if rope_type not in TYPES:
        raise UserError(f"rope_type {rope_type!r} is not implemented; ptune implements rope_type {sorted(TYPES)}")
    required, optional = TYPES[rope_type]
    missing = [k for k in required if k not in params]
    unknown = sorted(set(params) - set(required) - set(optional) - {"rope_type"})
    problems = ([f"missing {missing}"] if missing else []) + ([f"parameter(s) {unknown} not implemented"]
                                                              if unknown else [])
    if problems:
        raise UserError(f"rope_type {rope_type!r}: {'; '.join(problems)}")
    for key in required:
        value = params[key]
        optional_factor = rope_type == "yarn" and key == "factor" and value is None   # derived, as in transformers
        if not optional_factor and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise UserError(f"rope_type {rope_type!r}: {key}={value!r} must be a number > 0")


@functools.lru_cache(maxsize=64)
def frequencies(head_dim: int, theta: float, scaling: tuple, max_positions: int) -> tuple[np.ndarray, float]:
    """(inv_freq (head_dim/2,) float32, attention_factor): transformers' rope_init_fn for `scaling`."""
    params = dict(scaling) or {"rope_type": "default"}
    # float32 throughout, as transformers: at position p an angle is p * inv_freq, so one ulp of
    # inv_freq moves position 8000's angles by ~5e-4.
    base = np.float32(theta) ** (np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim))
    inv, attention = 1.0 / base, 1.0
    if params["rope_type"] == "linear":
        inv = inv / params["factor"]
    elif params["rope_type"] == "llama3":
        inv = _llama3(inv, params)
    elif params["rope_type"] == "yarn":
        inv, attention = _yarn(base, head_dim, theta, params, max_positions)
    return inv.astype(np.float32), float(attention)


def _llama3(inv: np.ndarray, p: dict) -> np.ndarray:
    """Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth ramp between."""
    factor, low, high, context = (p["factor"], p["low_freq_factor"], p["high_freq_factor"],
                                  p["original_max_position_embeddings"])
    # c / x written as (1 / x) * c, float32, as torch computes it: the same frequencies to the bit
    wavelen = (1 / inv) * np.float32(2 * math.pi)
    smooth = ((1 / wavelen) * np.float32(context) - low) / (high - low)
    medium = (1 - smooth) * inv / factor + smooth * inv
    return np.where(wavelen > context / low, inv / factor, np.where(wavelen < context / high, inv, medium))


def _yarn(base: np.ndarray, head_dim: int, theta: float, p: dict, max_positions: int) -> tuple[np.ndarray, float]:
    context = p["original_max_position_embeddings"]
    factor = p["factor"] or max_positions / context       # DeepSeek-style configs leave factor None
    mscale = lambda m=1.0: 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0
    attention = p.get("attention_factor")
    if attention is None:
        both = p.get("mscale") and p.get("mscale_all_dim")
        attention = mscale(p["mscale"]) / mscale(p["mscale_all_dim"]) if both else mscale()
    # The dimensions rotating fewer than beta_slow times over the context interpolate (inv / factor),
    # more than beta_fast times extrapolate (inv); a linear ramp in between.
    dim = lambda rotations: head_dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    lo, hi = dim(p.get("beta_fast") or 32), dim(p.get("beta_slow") or 1)
    if p.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, head_dim - 1)
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - lo) / ((hi + 0.001 if lo == hi else hi) - lo), 0, 1)
    return 1.0 / (factor * base) * ramp + 1.0 / base * (1 - ramp), attention


def llama3_from_divisors(divisors: np.ndarray, head_dim: int, theta: float) -> tuple | None:
    """The llama3 scaling whose frequencies are the unscaled ones divided by `divisors` (a GGUF's
    `rope_freqs` tensor; all ones: () for unscaled), or None when no llama3 scaling gives them.

    llama3 depends only on factor and the ratios of original_max_position_embeddings (L),
    low_freq_factor and high_freq_factor, so low_freq_factor = 1 (Llama 3.x's value) loses nothing.
    Between the bands 1 / divisor = (1 - s) / factor + s with s = L inv / (2 pi (h - 1)) - 1 / (h - 1),
    linear in inv_freq: two or more such frequencies fit L and h; the fit is checked on every frequency.
    """
    divisors = np.asarray(divisors, np.float64)
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if divisors.shape != inv.shape:
        return None
    if np.allclose(divisors, 1, rtol=0, atol=1e-6):
        return ()
    factor = round(float(divisors.max()), 5)             # stored as float32
    medium = (divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6))
    if factor <= 1 or medium.sum() < 2:
        return None
    s = (1 / divisors[medium] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(inv[medium], s, 1)
    if intercept >= 0:
        return None
    high = 1 - 1 / intercept
    context = round(slope * 2 * math.pi * (high - 1))
    scaling = normalise({"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                         "high_freq_factor": round(float(high), 4), "original_max_position_embeddings": context})
    fitted = frequencies(head_dim, theta, scaling, context)[0]
    return scaling if np.allclose(inv / divisors, fitted, rtol=1e-5, atol=0) else None
