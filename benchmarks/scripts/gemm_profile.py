"""One launch each of jep's grouped GEMM forward (G=8) and JAX's dense Pallas Hopper matmul at
M=32768 K=7168 N=2048, bf16, for Nsight Compute:

    ncu --launch-count 16 --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        --section SchedulerStats --section WarpStateStats --section Occupancy \\
        --section LaunchStats --print-details all python benchmarks/scripts/gemm_profile.py

jep's kernel is `jep_grouped_forward_mosaic_gpu_kernel` in the report, JAX's `anonymous_mosaic_gpu_kernel`
(the other launches are small XLA kernels around them).
"""

from __future__ import annotations

import jax

from gemm_power import products  # this folder, on the path when run as a script


def main():
    x, fns = products()
    for name in ("jep grouped forward", "JAX dense Pallas matmul"):
        jax.block_until_ready(jax.jit(fns[name])(x))
    print("done")


if __name__ == "__main__":
    main()
