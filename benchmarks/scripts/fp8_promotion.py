"""What the FP8 kernel's promotion costs (Hopper).

`jep_kernels.grouped_matmul.grouped_matmul_fp8` beside the same warp-specialized kernel and
config without the promotion (e4m3 operands, one float32 accumulator across K that the tensor
cores add into, no scales: not DeepSeek-V3's recipe, the ceiling of this pipeline), and XLA's
dense FP8 product of the same flops. 32768 rows, 8 groups, at the forward's K x N
(7168 x 2048) and the dx's (2048 x 7168); timed interleaved, 20 products a loop. ptxas's
spills are printed with MOSAIC_GPU_DUMP_PTXAS=1:

    MOSAIC_GPU_DUMP_PTXAS=1 python benchmarks/scripts/fp8_promotion.py [--groups 8]

The kernel without scales is the private `mgpu._grouped_matmul_ws` (the public entry points
take bf16, or e4m3 with scales), so this script is a diagnostic, not a product.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import jep_kernels.grouped_matmul as gm
from jep import fp8
from jep.bench import gemm, timing, workloads
from jep_kernels.grouped_matmul import mgpu, tuning


def bodies(config):
    """{name: product(x_rows, weight, group_sizes)} of the three variants."""
    def unscaled(xq, wq, sizes):
        return mgpu._grouped_matmul_ws([xq[0]], [wq.q_t], sizes, transpose_w=True,
                                       config=config, interpret=False, out_dtype=jnp.bfloat16)

    return {
        "the FP8 kernel": lambda xq, wq, sizes: gm.grouped_matmul_fp8(
            *xq, wq.q_t, wq.scales_t, sizes),
        "the same without the promotion": unscaled,
        "XLA's dense FP8": lambda xq, wq, sizes: gemm.dense_fp8(xq[0], wq.q_t[0]),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32768)
    parser.add_argument("--groups", type=int, default=8)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    runs = {}
    for k, n in ((7168, 2048), (2048, 7168)):
        rotations = workloads.gemm_operands("uniform", rng, (args.rows, k, n, args.groups),
                                            jnp.bfloat16)
        operands = [(jax.jit(fp8.quantize_rows)(x), workloads.quantize_weight(w), sizes)
                    for x, w, _, sizes in rotations]
        config = tuning.config_for(tuning.FP8, k, n, args.groups)
        print(f"K={k} N={n}: {config}", flush=True)
        for name, body in bodies(config).items():
            run = jax.jit(lambda operands, body=body: timing.repeat_rotated(body, operands, 20))
            runs[f"K={k} N={n}, {name}"] = (run.lower(operands).compile(), (operands,))
    seconds = timing.seconds_interleaved(runs, iters=20, repeats=7, min_seconds=0.3)
    print(f"{timing.environment()}\nM={args.rows}, G={args.groups}, ms a product:")
    for name, value in seconds.items():
        print(f"{name}: {value * 1e3:.3f}")


if __name__ == "__main__":
    main()
