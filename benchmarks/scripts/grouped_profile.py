"""jep's grouped products at one shape, each launched twice with the tuning table's
configuration, for Nsight Compute:

    ncu --set full -k regex:jep_grouped -c 4 -o dw python benchmarks/scripts/grouped_profile.py \\
        32768x7168x2048x256 dw,forward [random]
    ncu -i dw.ncu-rep --page details --print-units base

The kernels are named after their product (`jep_grouped_forward_mosaic_gpu_kernel`, `..._dx_...`,
`..._dw_...`); the operands (bf16, group sizes after the routing given, uniform by default:
`jep.bench.workloads.ROUTINGS`) are drawn on the device first.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from jep.bench import workloads
from jep_kernels.grouped_matmul import mgpu, tuning


def main(shape: str, ops: str, routing: str = "uniform"):
    m, k, n, g = (int(v) for v in shape.split("x"))
    x, w, dy, sizes = workloads.gemm_operands(routing, np.random.default_rng(0), (m, k, n, g),
                                              jnp.bfloat16, rotation=1)[0]
    jax.block_until_ready((x, w, dy, sizes))
    for op in ops.split(","):
        config = tuning.config_for(op, *tuning.product_shape(op, k, n), g)
        print(op, config, flush=True)
        if op == "dw":
            def run(x, dy, s, config=config):
                return mgpu.grouped_matmul_dw(x, dy, s, config=config)
            args = (x, dy, sizes)
        else:  # dx = dy @ w^T: the forward's kernel reading w transposed
            def run(a, w, s, config=config, transpose_w=op == "dx"):
                return mgpu.grouped_matmul(a, w, s, transpose_w=transpose_w, config=config)
            args = (dy if op == "dx" else x, w, sizes)
        run = jax.jit(run)
        for _ in range(2):
            jax.block_until_ready(run(*args))


if __name__ == "__main__":
    main(*sys.argv[1:4])
