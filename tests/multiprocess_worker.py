"""One of the processes of tests/test_multiprocess.py, and what they compute.

Started as `python tests/multiprocess_worker.py --process-id I --num-processes N --port P --out F`:
each process has 4 CPU devices, joins the others through `jax.distributed` on localhost (CPU
collectives through gloo), and all of them compute `compute` over one (node, local) mesh of their
devices; process 0 writes the result to F (.npz). The test computes the same in one process.
"""

from __future__ import annotations

import argparse
import os
import sys

AXES = ("node", "local")
DEVICES_PER_PROCESS = 4


def compute(mesh) -> dict:
    """Dispatch and combine (flat and hierarchical) and jep.moe over `mesh`'s (node, local)
    axes on fixed inputs: outputs and gradients as numpy arrays, the same in any process, and
    under "transports" the transports the hierarchical hops took (node, local)."""
    import jax

    with jax.set_mesh(mesh):  # lets `auto` see which devices each axis spans
        return _compute(mesh)


def _compute(mesh) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P

    import jep

    n = mesh.size
    num_tokens, hidden, top_k, num_experts = 6, 8, 3, 2 * n
    rng = np.random.default_rng(7)
    ids = np.argsort(rng.random((n, num_tokens, num_experts)), axis=-1)[..., :top_k]
    ids = np.where(rng.random(ids.shape) < 0.2, -1, ids).astype(np.int32)
    x = rng.normal(size=(n, num_tokens, hidden)).astype(np.float32)
    weights = rng.random(ids.shape).astype(np.float32)
    g = rng.normal(size=x.shape).astype(np.float32)

    def global_array(value, spec):
        sharding = NamedSharding(mesh, spec)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    def gathered(tree):
        return jax.tree.map(lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)),
                            tree)

    ranks = P(AXES)
    args = [global_array(a, ranks) for a in (x, ids, weights, g)]
    results = {}
    transports = []
    for mode in ("flat", "hierarchical"):
        def local(x, ids, weights, mode=mode):
            recv_x, group_sizes, handle = jep.dispatch(
                x[0], ids[0], num_experts=num_experts, axis_name=AXES, mode=mode)
            if mode == "hierarchical":
                transports[:] = [handle.node.backend, handle.local.backend]
            kept = jnp.arange(recv_x.shape[0]) < group_sizes.sum()
            y = jnp.where(kept[:, None], 2 * recv_x + 1, 0)
            return jep.combine(y, handle, weights[0])[None]

        mapped = jax.shard_map(local, mesh=mesh, in_specs=(ranks,) * 3, out_specs=ranks)

        def loss(x, weights, ids, g, mapped=mapped):
            out = mapped(x, ids, weights)
            return jnp.sum(out * g), out

        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
            args[0], args[2], args[1], args[3])
        out, dx, dweights = gathered((out, *grads))
        results |= {f"{mode}/out": out, f"{mode}/dx": dx, f"{mode}/dweights": dweights}

    config = jep.MoEConfig(num_experts=num_experts, top_k=2, axis_name=AXES,
                           dispatch=jep.DispatchConfig(mode="hierarchical"))
    params = jep.init_params(jax.random.key(1), hidden=hidden, ffn=12, config=config)
    params = {name: global_array(np.asarray(value), P(AXES) if name.startswith("w_") else P())
              for name, value in params.items()}
    tokens = global_array(x.reshape(-1, hidden), P(AXES))
    cotangent = global_array(g.reshape(-1, hidden), P(AXES))

    def moe_loss(params, tokens, cotangent):
        y, _ = jep.moe(tokens, params, config=config, mesh=mesh)
        return jnp.sum(y * cotangent), y

    (_, y), (dparams, dtokens) = jax.jit(jax.value_and_grad(moe_loss, argnums=(0, 1),
                                                            has_aux=True))(params, tokens, cotangent)
    results |= {"moe/y": gathered(y), "moe/dx": gathered(dtokens),
                "transports": np.array(transports)}
    results |= {f"moe/d{name}": value for name, value in gathered(dparams).items()}
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--process-id", type=int, required=True)
    p.add_argument("--num-processes", type=int, default=2)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    # Before jax is imported: this process's devices.
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"
    import jax
    import numpy as np

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{args.port}", num_processes=args.num_processes,
                               process_id=args.process_id, initialization_timeout=120)
    num_devices = DEVICES_PER_PROCESS * args.num_processes
    mesh = jax.make_mesh((args.num_processes, num_devices // args.num_processes), AXES,
                         axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    results = compute(mesh)
    if args.process_id == 0:
        np.savez(args.out, **results)
    jax.distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
