"""Per-device bytes of GPT-2 small's frozen base under each mesh, measured from the placed
arrays' shards on 8 fake CPU devices (LoRA r=8: the base is frozen, the sites replicated).

    python benchmarks/sharded_base.py

Prints, per (data, fsdp, tensor) mesh, the bytes the fullest device holds and the shrink factor
against one device, for the whole base and for its 2-D kernels.
"""

import jax

jax.config.update("jax_num_cpu_devices", 8)

from ptune import methods, models, partition, sharding  # noqa: E402
from ptune.config import base_config  # noqa: E402

from ptune import cli  # noqa: E402

cli.set_xla_flags()   # as the launchers, before JAX starts

MESHES = [(8, 1, 1), (4, 2, 1), (2, 2, 2), (1, 8, 1), (1, 2, 4), (1, 1, 8)]


def fullest(tree) -> int:
    return max(sharding.bytes_per_device(tree).values())


def main():
    cfg = models.model_config("gpt2")
    method = methods.get("lora", cfg)
    model = models.build(cfg, method.sites)
    params = models.init(model, jax.random.key(0))
    trainable, frozen = partition.split(params, method.labels(params))
    kernels = lambda tree: {p: x for p, x in partition.flatten(tree).items() if p.endswith("/kernel") and x.ndim == 2}
    boxed = models.abstract_params(model)
    whole, whole_k = fullest(frozen), fullest(kernels(frozen))
    print(f"GPT-2 small frozen base: {whole / 1e6:.1f} MB ({whole_k / 1e6:.1f} MB in 2-D kernels), "
          f"LoRA sites {partition.summary(trainable, jax.tree.map(lambda _: 'lora', trainable)).total:,} params")
    print(f"{'mesh':>8} {'fsdp x tensor':>14} {'MB/device':>10} {'shrink':>7} {'kernels shrink':>15}")
    for shape in MESHES:
        config = base_config()
        config.mesh.update(dict(zip(sharding.AXES, shape)))
        mesh = sharding.make_mesh(config.mesh)
        placed = sharding.put(frozen, sharding.param_shardings(frozen, boxed, mesh, config.mesh))
        held = fullest(placed)
        print(f"{'x'.join(map(str, shape)):>8} {shape[1] * shape[2]:>14} {held / 1e6:>10.1f} {whole / held:>7.2f} "
              f"{whole_k / fullest(kernels(placed)):>15.2f}")
        del placed


if __name__ == "__main__":
    main()
