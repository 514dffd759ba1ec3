"""Grouped GEMM: jep's grouped matmul (forward, dx, dw) against lax.ragged_dot and a dense matmul
of the same flops. Shapes M x K x N with G groups: y[M, N] = x[M, K] @ w[g][K, N] per group.

"jep" is `jep.grouped_matmul` with backend "auto" (each result names the backend it took: the
Pallas Mosaic GPU kernels of `jep_kernels.grouped_matmul` on a Hopper GPU). On a GPU it is
measured beside the grouped GEMMs JAX ships as examples
(`jax.experimental.pallas.ops.gpu`: `ragged_dot_mgpu` for the forward and dx,
`transposed_ragged_dot_mgpu` for dw; the configuration of `../shared/GPU.md`'s 521-524 TFLOP/s),
and tokamax's `ragged_dot` (its Mosaic GPU kernels, forward and both gradients) where tokamax is
installed (`pip install tokamax`; not a dependency of jep)."""

from __future__ import annotations

import jax
import numpy as np
from jax import lax

import jep
from jep import experts
from jep.bench import timing, workloads


def _ops(matmul):
    """forward, dx and dw of one grouped matmul `matmul(x, w, group_sizes)`."""
    def forward(x, w, dy, sizes):
        return matmul(x, w, sizes)

    def dx(x, w, dy, sizes):
        return jax.vjp(lambda x: matmul(x, w, sizes), x)[1](dy)[0]

    def dw(x, w, dy, sizes):
        return jax.vjp(lambda w: matmul(x, w, sizes), w)[1](dy)[0]

    return {"forward": forward, "dx": dx, "dw": dw}


def _jax_pallas_ops():
    """forward, dx and dw from jax.experimental.pallas.ops.gpu's grouped-GEMM examples."""
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu

    tiles = dict(block_m=192, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=2)
    return {
        "forward": lambda x, w, dy, s: ragged_dot_mgpu.ragged_dot(x, w, group_sizes=s, **tiles),
        "dx": lambda x, w, dy, s: ragged_dot_mgpu.ragged_dot(dy, w, group_sizes=s,
                                                             transpose_rhs=True, **tiles),
        "dw": lambda x, w, dy, s: transposed_ragged_dot_mgpu.transposed_ragged_dot(
            x, dy, group_sizes=s, block_m=128, block_n=128, block_k=64, max_concurrent_steps=4,
            grid_block_n=1),
    }


def _tokamax_ragged_dot():
    """tokamax's `ragged_dot` on its Pallas Mosaic GPU kernels, where tokamax is installed."""
    try:
        import tokamax
        from absl import flags
    except ImportError:
        return None
    if not flags.FLAGS.is_parsed():  # tokamax reads absl flags; the command line is not theirs
        flags.FLAGS.mark_as_parsed()
    return lambda x, w, s: tokamax.ragged_dot(x, w, s, implementation="mosaic")


# The dense peer: one [M, K] @ [K, N] (the same flops as the grouped product), and the two
# backward products, with the grouped products' arguments (x, w, dy, group sizes).
DENSE = {"forward": lambda x, w, dy, sizes: x @ w[0], "dx": lambda x, w, dy, sizes: dy @ w[0].T,
         "dw": lambda x, w, dy, sizes: x.T @ dy}


def measure(*, shapes, dtype, routing: str, iters: int, repeats: int,
            min_seconds: float = 0.0, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    variants = {
        "jep": jep.grouped_matmul,
        "lax.ragged_dot": lambda x, w, s: lax.ragged_dot(x, w, s),
    }
    if jax.default_backend() == "gpu" and (tokamax := _tokamax_ragged_dot()) is not None:
        variants["tokamax"] = tokamax
    results = []
    for m, k, n, g in shapes:
        rotations = workloads.gemm_operands(routing, rng, (m, k, n, g), dtype)
        flops = 2.0 * m * k * n
        jep_backend = experts.grouped_matmul_backend(*rotations[0][:2])

        runs = {}

        def record(variant, op, body):
            run = jax.jit(lambda rotations: timing.repeat_rotated(body, rotations, iters))
            runs[variant, op] = (run, (rotations,))

        for variant, matmul in variants.items():
            for op, body in _ops(matmul).items():
                record(variant, op, body)
        if jax.default_backend() == "gpu":
            for op, body in _jax_pallas_ops().items():
                record("jax.experimental.pallas.ops", op, body)
        for op, body in DENSE.items():
            record("dense matmul", op, body)
        # Every variant of the shape timed in turn, round by round (seconds_interleaved).
        for (variant, op), seconds in timing.seconds_interleaved(
                runs, iters=iters, repeats=repeats, min_seconds=min_seconds).items():
            entry = {"suite": "gemm", "variant": variant, "op": op, "m": m, "k": k, "n": n,
                     "groups": g, "routing": routing}
            if variant == "jep":
                entry["backend"] = jep_backend
            if isinstance(seconds, Exception):  # an out-of-memory peer is a result
                entry |= {"seconds": None, "tflop_per_s": None,
                          "error": str(seconds).splitlines()[0][:200]}
            else:
                entry |= {"seconds": seconds, "tflop_per_s": flops / seconds / 1e12}
            results.append(entry)
    for r in results:
        dense = next(d for d in results if d["variant"] == "dense matmul" and d["op"] == r["op"]
                     and (d["m"], d["k"], d["n"], d["groups"]) == (r["m"], r["k"], r["n"], r["groups"]))
        r["vs_dense"] = (None if r["tflop_per_s"] is None or dense["tflop_per_s"] is None
                         else r["tflop_per_s"] / dense["tflop_per_s"])
    return results
