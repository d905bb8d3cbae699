"""The adapter bank: K tasks' trainable subtrees on one frozen base, served in mixed batches.

    bank = Bank(model_config, base, {"sst": TaskAdapter.from_trained(method, model, params, label_ids)},
                capacity=8)
    bank.classify(input_ids, attention_mask, ["sst", "spam", "sst"])   # (B, classes), padded classes -inf
    bank.generate(prompts, ["chat", "qa"], 16, eos_id=..., pad_id=...)
    bank.put("spam", adapter)        # add or swap: an in-place write of same-shaped arrays, no recompile

Every leaf some task trains becomes a *bank leaf* of shape (capacity, *leaf shape); the
rest of the tree is the shared frozen base. A mixed batch gathers each example's row
and runs the model's own `apply` under `jax.vmap` (the base enters unbatched, so its
matmuls stay one matmul over the batch). The models need no per-example code, and the
cost is small: on GPT-2 small a mixed batch of 4 LoRA tasks ran at 4.0 examples/s
against 4.2 for one task's own model (benchmarks/adapter_swap.py, 2-core CPU).

The bank's shapes (its *envelope*) are fixed by the tasks it is created with, so later
writes never change a shape. Each site kind says how it stacks (`SiteKind.bank_spec`,
`bank_leaf`, `paddable`); a kind that does not say cannot be banked. Tasks may differ where
zero-padding is exact:

* LoRA rank (A's extra columns and B's extra rows are 0) and alpha: B is stored times
  the task's alpha/r, the bank's LoRA scale is 1. Targets may differ: a layer a task
  does not adapt keeps B = 0.
* adapter size (every activation has act(0) = 0, so padded units are dead) and placement
  (a Pfeiffer task's attention adapter has up = 0); IA3 targets (missing scales are 1).
* number of classes: a head or a verbalizer is padded and the extra classes masked to -inf.
* a task that lacks a site gets the site's identity value (the bank model's fresh
  initialisation, where LoRA B = 0, adapter up = 0, IA3 = 1); a task that trains base leaves
  (BitFit biases) overrides them, the others keep the base value.

Soft prompts and prefixes must have one length in the whole bank (or be absent from every
task): padding them would need a per-example position mask inside the models, which
they do not have, so such a bank is refused with the reason.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ptune import models, partition
from ptune.errors import UserError
from ptune.inference import generate as generate_lib
from ptune.methods import head
from ptune.models.sites import KINDS, Sites, kind_of

HEAD = re.compile(head.HEAD)


@dataclasses.dataclass(frozen=True)
class TaskAdapter:
    """One task's artifact: its sites (a prefix in folded form) and trainable subtree.

    Classification is by `label_ids` (verbalizer: the first token of each class's word)
    or by the task head in `params` (`classifier`/`score`); a task with neither only
    generates.
    """
    sites: Sites
    params: dict
    label_ids: tuple[int, ...] = ()

    @classmethod
    def from_trained(cls, method, model, params, label_ids: Sequence[int] = ()) -> TaskAdapter:
        """From a method, its model and full trained params: folds a prefix, keeps the trainable leaves."""
        params, sites = method.folded(params, model)
        trainable, _ = partition.split(params, method.labels(params))
        return cls(sites, trainable, tuple(int(i) for i in label_ids))

    @property
    def head_classes(self) -> int:
        kernels = [x for p, x in partition.flatten(self.params).items() if HEAD.match(p) and p.endswith("/kernel")]
        return kernels[0].shape[-1] if kernels else 0

    @property
    def num_classes(self) -> int:
        return len(self.label_ids) or self.head_classes

    @property
    def objective(self) -> str:
        return "verbalizer" if self.label_ids else "head" if self.head_classes else "generate"


def envelope(sites: dict[str, Sites]) -> Sites:
    """The smallest sites that hold every task's {name: sites}, each kind's `bank_spec` (max LoRA rank
    and adapter size, union of targets...). Sites that cannot share a bank are an error naming the tasks."""
    present = [name for name in KINDS if any(getattr(s, name) is not None for s in sites.values())]
    for name in present:
        if not KINDS[name].implements("bank_spec"):
            raise KINDS[name].missing("how the adapter bank stacks it", "bank_spec")
    return Sites(**{name: KINDS[name].bank_spec({task: getattr(s, name) for task, s in sites.items()})
                    for name in present})


class Bank:
    """A fixed-capacity bank of task adapters over one frozen base (see the module docstring).

    `base`: the frozen base weights (nested dicts, e.g. `partition.split(params, labels)[1]`).
    `adapters`: the tasks that fix the bank's shapes (its envelope); `capacity`: the most
    tasks it will hold at once (default: exactly those).
    """

    def __init__(self, model_config, base, adapters: dict[str, TaskAdapter], capacity: int | None = None,
                 rng=None):
        if not adapters:
            raise UserError("Bank needs at least one task adapter to fix its shapes")
        self.capacity = capacity or len(adapters)
        if self.capacity < len(adapters):
            raise UserError(f"Bank capacity={self.capacity} is less than the {len(adapters)} tasks given")
        kinds = {name: a.objective for name, a in adapters.items()}
        if len(set(kinds.values()) - {"generate"}) > 1:
            raise UserError(f"tasks classify in different ways {kinds}; a bank classifies either by verbalizer "
                            "or by head: bank these tasks separately")
        self.objective = next((k for k in kinds.values() if k != "generate"), "generate")
        self.num_classes = max(a.num_classes for a in adapters.values())
        self.sites = envelope({name: a.sites for name, a in adapters.items()})
        head_labels = self.num_classes if self.objective == "head" else model_config.num_labels
        self.config = dataclasses.replace(model_config, num_labels=head_labels)
        self.model = models.build(self.config, self.sites)
        paths = sorted({p for a in adapters.values() for p in partition.flatten(a.params)})
        template = partition.flatten(models.init(self.model, rng if rng is not None else jax.random.key(0),
                                                 pretrained=partition.unflatten(_base_weights(model_config, base))))
        missing = [p for p in paths if p not in template]
        if missing:
            raise UserError(f"task leaves {missing[:3]} are not parameters of the bank's model "
                            f"({self.config.family}, sites {self.sites})")
        # What a task that lacks a leaf gets: the site's identity init, or the base's value.
        self.identity = {p: np.asarray(template[p]) for p in paths}
        self.frozen = partition.unflatten({p: x for p, x in template.items() if p not in self.identity})
        self.stacked = {p: jnp.asarray(np.broadcast_to(x, (self.capacity,) + x.shape))
                        for p, x in self.identity.items()}
        self.label_ids = jnp.zeros((self.capacity, max(self.num_classes, 1)), jnp.int32)
        self.class_count = jnp.zeros((self.capacity,), jnp.int32)
        self.slots: dict[str, int] = {}
        self._write = jax.jit(_write, donate_argnums=(0,))
        self._classify = jax.jit(self._classify_rows)
        self._generate = jax.jit(self._generate_rows, static_argnames=("max_new_tokens", "temperature", "top_k",
                                                                        "top_p"))
        for name, adapter in adapters.items():
            self.put(name, adapter)

    # ---- adding, swapping, removing -------------------------------------------------------------

    def put(self, name: str, adapter: TaskAdapter):
        """Add task `name`, or swap its adapter if present: one jitted in-place write, no new shapes.

        Everything is checked before anything is written, so an error leaves the bank as it was.
        """
        slot = self.slots.get(name)
        if slot is None:
            free = sorted(set(range(self.capacity)) - set(self.slots.values()))
            if not free:
                raise UserError(f"the bank is full ({self.capacity} tasks: {sorted(self.slots)}); remove one "
                                "or create the bank with a larger capacity")
            slot = free[0]
        self._write_slot(slot, self._rows_for(name, adapter), adapter.label_ids, adapter.num_classes)
        self.slots[name] = slot

    def remove(self, name: str):
        """Drop task `name`; its slot returns to the identity and is free for the next `put`."""
        self._write_slot(self.task_slots([name])[0], self.identity, (), 0)
        del self.slots[name]

    def _write_slot(self, slot: int, rows: dict[str, np.ndarray], label_ids: Sequence[int], num_classes: int):
        label_row = np.zeros(self.label_ids.shape[1], np.int32)
        label_row[:len(label_ids)] = label_ids
        state = (self.stacked, self.label_ids, self.class_count)
        self.stacked, self.label_ids, self.class_count = self._write(
            state, np.int32(slot), (rows, label_row, np.int32(num_classes)))

    def _rows_for(self, name: str, adapter: TaskAdapter) -> dict[str, np.ndarray]:
        """The task's value for every bank leaf, padded to the bank's shapes (host arrays)."""
        if adapter.objective not in ("generate", self.objective):
            raise UserError(f"task {name!r} classifies by {adapter.objective}; this bank classifies by "
                            f"{self.objective}")
        if adapter.num_classes > self.num_classes:
            raise UserError(f"task {name!r} has {adapter.num_classes} classes; this bank holds at most "
                            f"{self.num_classes}: create the bank with this task so its envelope holds it")
        envelope({"the bank": self.sites, name: adapter.sites})   # the kinds' specs can share the bank
        flat = partition.flatten(adapter.params)
        extra = sorted(set(flat) - set(self.identity))
        if extra:
            raise UserError(f"task {name!r} trains {extra[:3]}, which this bank does not hold (its leaves are "
                            f"e.g. {sorted(self.identity)[:3]}); create the bank with this task among its tasks")
        return {path: self._row(name, adapter.sites, path, flat[path]) if path in flat else identity
                for path, identity in self.identity.items()}

    def _row(self, name: str, sites: Sites, path: str, value) -> np.ndarray:
        """The task's leaf as its kind stores it (LoRA folds alpha/r into B, the bank's LoRA scale being 1),
        padded to the bank's shape."""
        identity, kind = self.identity[path], kind_of(path)
        value = np.asarray(value, identity.dtype)
        if kind is not None:
            try:
                value = kind.bank_leaf(getattr(sites, kind.name), getattr(self.sites, kind.name), path, value)
            except ValueError as e:
                raise UserError(f"task {name!r}: {e}") from None
        return _pad(name, path, value, identity.shape, kind)

    # ---- serving ----------------------------------------------------------------------------------

    def task_slots(self, names: Sequence[str]) -> np.ndarray:
        """(B,) slot of each example's task; an unknown name is an error naming the known tasks."""
        unknown = sorted({n for n in names if n not in self.slots})
        if unknown:
            raise UserError(f"unknown task(s) {unknown}; the bank holds {sorted(self.slots)}")
        return np.asarray([self.slots[n] for n in names], np.int32)

    def classify(self, input_ids, attention_mask, tasks: Sequence[str]) -> np.ndarray:
        """(B, max classes) float32 class logits, each example scored by its task's adapter;
        classes beyond a task's own count are -inf."""
        slots = self.task_slots(tasks)
        if self.objective == "generate":
            raise UserError(f"no task in this bank classifies (tasks {sorted(self.slots)}); use generate")
        return np.asarray(self._classify(self.stacked, self.frozen, self.label_ids, self.class_count, slots,
                                         np.asarray(input_ids, np.int32), np.asarray(attention_mask, np.int32)))

    def generate(self, prompts: list[list[int]], tasks: Sequence[str], max_new_tokens: int, *, eos_id: int,
                 pad_id: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, rng=None) -> np.ndarray:
        """(B, max_new_tokens) ids, as `ptune.inference.generate.generate` with each prompt's task adapter.
        Sampling draws each example from its own key (split from `rng`)."""
        slots = self.task_slots(tasks)
        ids, mask = generate_lib.request(self.model, prompts, max_new_tokens, pad_id, temperature, top_k, top_p)
        rng = jax.random.key(0) if rng is None else rng
        return np.asarray(self._generate(self.stacked, self.frozen, slots, ids, mask, rng, np.int32(eos_id),
                                         np.int32(pad_id), max_new_tokens=max_new_tokens,
                                         temperature=float(temperature), top_k=int(top_k), top_p=float(top_p)))

    def _per_example(self, stacked, frozen, slots, fn, *args):
        """vmap `fn(params, *per_example_args)` over the batch, each example with its task's leaves."""
        rows = {p: x[slots] for p, x in stacked.items()}
        one = lambda row, *xs: fn(partition.merge(frozen, partition.unflatten(row)), *xs)
        return jax.vmap(one)(rows, *args)

    def _classify_rows(self, stacked, frozen, label_ids, class_count, slots, ids, mask):
        output = "class" if self.objective == "head" else "last_logits"
        apply = lambda params, i, m: self.model.apply({"params": params}, i[None], m[None], output=output)[0]
        logits = self._per_example(stacked, frozen, slots, apply, ids, mask).astype(jnp.float32)
        if self.objective == "verbalizer":
            logits = jnp.take_along_axis(logits, label_ids[slots], axis=1)
        valid = jnp.arange(logits.shape[1])[None] < class_count[slots][:, None]
        return jnp.where(valid, logits, -jnp.inf)

    def _generate_rows(self, stacked, frozen, slots, ids, mask, rng, eos_id, pad_id, **options):
        keys = jax.random.split(rng, ids.shape[0])

        def one(params, i, m, key):
            return generate_lib.decode(self.model, params, i[None], m[None], key, eos_id, pad_id, **options)[0]
        return self._per_example(stacked, frozen, slots, one, ids, mask, keys)


def _write(state, slot, values):
    """state.at[slot].set(values) for every array: same shapes in and out, so it compiles once."""
    return jax.tree.map(lambda x, v: x.at[slot].set(v.astype(x.dtype)), state, values)


def _pad(task: str, path: str, value: np.ndarray, shape: tuple[int, ...], kind) -> np.ndarray:
    """`value` zero-padded to `shape` along the leaf's paddable axis (its kind's `paddable`); any other
    difference is an error."""
    axis = kind.paddable.get(path.rsplit("/", 1)[-1]) if kind else None
    if HEAD.match(path):
        axis = value.ndim - 1   # head kernel (d, classes), bias (classes,)
    fits = value.ndim == len(shape) and all(v == s or (i == axis and v <= s)
                                            for i, (v, s) in enumerate(zip(value.shape, shape)))
    if not fits:
        why = ("only LoRA rank, adapter size and the number of classes may differ between a bank's tasks, "
               "up to the sizes of the tasks the bank was created with")
        raise UserError(f"task {task!r}: {path} has shape {value.shape}, the bank holds {shape}; {why} "
                        "(was it trained on another base model, or does it need a bigger bank?)")
    out = np.zeros(shape, value.dtype)
    out[tuple(slice(0, n) for n in value.shape)] = value
    return out


def _base_weights(model_config, base) -> dict:
    """{path: array} of the plain model's weights (no sites, no head) taken from `base`, which
    must hold every one of them with its shape; anything else in `base` is ignored."""
    plain = models.build(dataclasses.replace(model_config, num_labels=0))
    expected = partition.flatten(nn.unbox(models.abstract_params(plain)))
    given = partition.flatten(base)
    missing = [p for p in expected if p not in given]
    wrong = [(p, given[p].shape, expected[p].shape) for p in expected
             if p in given and given[p].shape != expected[p].shape]
    if missing or wrong:
        raise UserError(f"the base does not fit model {model_config.family}: missing {missing[:3]}, "
                        f"shapes (given, expected) {wrong[:3]}; pass the frozen weights of this model")
    return {p: given[p] for p in expected}
