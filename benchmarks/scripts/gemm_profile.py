"""One launch each of jep's grouped GEMM forward (G=8) and JAX's dense Pallas Hopper matmul at
M=32768 K=7168 N=2048, bf16, for Nsight Compute; or of the products named (`gemm_power`'s
names: "jep FP8 forward" and "jep FP8 forward, cluster 2" are issue 21's):

    ncu --launch-count 16 --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        --section SchedulerStats --section WarpStateStats --section Occupancy \\
        --section LaunchStats --print-details all python benchmarks/scripts/gemm_profile.py [NAME ...]

jep's kernel is `jep_grouped_forward_mosaic_gpu_kernel` in the report (the FP8 one
`jep_grouped_fp8_mosaic_gpu_kernel`), JAX's `anonymous_mosaic_gpu_kernel` (the other launches
are small XLA kernels around them).
"""

from __future__ import annotations

import sys

import jax

from gemm_power import products  # this folder, on the path when run as a script


def main():
    x, fns = products()
    for name in sys.argv[1:] or ("jep grouped forward", "JAX dense Pallas matmul"):
        jax.block_until_ready(jax.jit(fns[name])(x))
    print("done")


if __name__ == "__main__":
    main()
