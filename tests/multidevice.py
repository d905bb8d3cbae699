"""One train step per method, on one device and under several meshes of 8 fake CPU devices.

Run by tests/test_sharding.py in its own process (the device count is fixed when JAX starts):
    python tests/multidevice.py OUT.json METHOD[@PRESET][:OPTIMIZER] ...
For every method it records, per mesh (data, fsdp, tensor): the loss, the largest difference of
any updated trainable parameter from the single-device step, and the frozen base's bytes on the
fullest device, split into 2-D kernels and everything else.
"""

import dataclasses
import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402

from ptune import partition, sharding  # noqa: E402
from ptune.config import base_config, with_method  # noqa: E402
from ptune.data import batching  # noqa: E402
from ptune.training import builder, compute  # noqa: E402

MESHES = [(1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 2, 4)]


def config_for(method: str, preset: str, optimizer: str):
    config = with_method(base_config(), method)
    # SGD with learning rate 1 makes the update the (clipped) gradient itself, so the comparison
    # sees every gradient difference unscaled. Adam's first step is ~lr * g / |g|, which amplifies
    # rounding in near-zero gradients; it is checked with its own tolerance.
    config.optim.update(optimizer=optimizer, learning_rate=1.0 if optimizer == "sgd" else 1e-3)
    config.model.preset = preset
    config.task.options = {"n_train": 64, "n_eval": 32}
    config.task.max_length = 32
    if method == "head":
        config.task.objective = "head"
    config.mesh.update(data=1, fsdp=1, tensor=1)
    config.train.update(batch_size=8, eval_batch_size=8, progress=False)
    return config


def one_step(run, trainable, frozen, batch, mesh_shape):
    run.config.mesh.update(dict(zip(sharding.AXES, mesh_shape)))
    run = dataclasses.replace(run, mesh=sharding.make_mesh(run.config.mesh))
    where = compute.layout(run, trainable, frozen)
    t, f = sharding.put(trainable, where.trainable), sharding.put(frozen, where.frozen)
    opt_state = jax.jit(run.tx.init, out_shardings=where.opt_state)(t)
    new, _, metrics = compute.make_train_step(run, where)(t, opt_state, f, sharding.put_batch(batch, where.batch),
                                                        jax.random.key(0))
    held = {"kernels": 0, "other": 0}
    for path, x in partition.flatten(f).items():
        kind = "kernels" if x.ndim == 2 and path.endswith("/kernel") else "other"
        held[kind] += max(sharding.bytes_per_device([x]).values())
    return float(metrics["loss_sum"]) / float(metrics["count"]), sharding.to_host(new), held


def main(out_path, *methods):
    results = {}
    for spec in methods:
        method, optimizer = (spec.split(":") + ["sgd"])[:2]
        method, preset = (method.split("@") + ["gpt2-tiny"])[:2]
        run = builder.setup(config_for(method, preset, optimizer))
        trainable, frozen = jax.tree.map(np.asarray, partition.split(run.params, run.labels))
        batch = batching.batch_at(run.data["train"], 0, 8, 0)
        full = {k: sum(partition.nbytes(x) for p, x in partition.flatten(frozen).items()
                       if (x.ndim == 2 and p.endswith("/kernel")) == (k == "kernels"))
                for k in ("kernels", "other")}
        base_loss, base_new, _ = one_step(run, trainable, frozen, batch, MESHES[0])
        rows = {}
        for mesh in MESHES[1:]:
            loss, new, held = one_step(run, trainable, frozen, batch, mesh)
            diff = max(float(np.max(np.abs(new_x - base_x))) for new_x, base_x in
                       zip(jax.tree.leaves(new), jax.tree.leaves(base_new)))
            moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(base_new),
                                                                     jax.tree.leaves(trainable)))
            rows["x".join(map(str, mesh))] = dict(loss=loss, loss_diff=abs(loss - base_loss), param_diff=diff,
                                                  step_size=moved, held=held)
        results[spec] = dict(loss=base_loss, full_bytes=full, meshes=rows)
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
