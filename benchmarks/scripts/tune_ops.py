"""Every tuning candidate of some of the grouped GEMM's products at one shape, timed as `python -m
jep.bench tune` times them (in turn, round by round, each sample a second or a fraction of one),
with the dense matmul of the same flops among them; prints TFLOP/s, fastest first. For a look at
one product without `tune`'s three (each candidate compiles in a few seconds, and `tune` at one
shape took more than 4 minutes).

    python benchmarks/scripts/tune_ops.py --shape 32768x1024x512x8 forward dx

Needs a Hopper GPU. It writes no table: a pick is copied into
`jep_kernels/grouped_matmul/table.json` by hand, with this command in the table's "runs".
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from jep.bench import timing, workloads
from jep.bench.tune import _describe, _product
from jep_kernels.grouped_matmul import tuning

DENSE = {"forward": lambda x, w, dy, sizes: x @ w[0], "dx": lambda x, w, dy, sizes: dy @ w[0].T,
         "dw": lambda x, w, dy, sizes: x.T @ dy}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ops", nargs="+", choices=tuning.OPS)
    p.add_argument("--shape", default="32768x1024x512x8", help="MxKxNxG")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--min-seconds", type=float, default=0.2)
    args = p.parse_args(argv)
    m, k, n, g = (int(v) for v in args.shape.split("x"))
    rng = np.random.default_rng(0)
    rotations = [(jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16),
                  jnp.asarray(rng.normal(size=(g, k, n)) / k**0.5, jnp.bfloat16),
                  jnp.asarray(rng.normal(size=(m, n)), jnp.bfloat16),
                  jnp.asarray(workloads.group_sizes("uniform", rng, m, g))) for _ in range(2)]
    for op in args.ops:
        product_k, product_n = tuning.product_shape(op, k, n)
        bodies = {_describe(c): (_product(op, c), c)
                  for c in tuning.candidates(op, product_k, product_n)}
        bodies["dense matmul"] = (DENSE[op], None)
        runs = {name: (jax.jit(lambda r, body=body: timing.repeat_rotated(body, r, args.iters)),
                       (rotations,)) for name, (body, _) in bodies.items()}
        seconds = timing.seconds_interleaved(runs, iters=args.iters, repeats=args.repeats,
                                             min_seconds=args.min_seconds)
        rate = {name: (None if isinstance(s, Exception) else 2.0 * m * k * n / s / 1e12)
                for name, s in seconds.items()}
        for name in sorted(rate, key=lambda name: -(rate[name] or 0)):
            config = bodies[name][1]
            print(op, name, "failed" if rate[name] is None else f"{rate[name]:.1f}",
                  json.dumps(dataclasses.asdict(config)) if config else "", flush=True)


if __name__ == "__main__":
    main()
