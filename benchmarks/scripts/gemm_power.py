"""The GEMM shape of issue 6 (M=32768 K=7168 N=2048, bf16) held for seconds: jep's grouped
forward (G=8), JAX's dense Pallas Hopper matmul and XLA's dense matmul, then jep's FP8 grouped
forward (issue 21: x and w quantized beforehand; the table's configuration, then the 2-block
cluster multicasting x), one after the other, each looped for a few seconds, with the SM clock
and the power nvidia-smi sampled meanwhile.

    python benchmarks/scripts/gemm_power.py [NAME ...]   (all by default)

An H200 runs these products at its power cap, so the clock, and with it a product's TFLOP/s,
depends on how long and how hard the GPU has been working. Needs a Hopper GPU and nvidia-smi.
"""

from __future__ import annotations

import csv
import dataclasses
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu

import jep_kernels.grouped_matmul as grouped
from jep import fp8

M, K, N, G = 32768, 7168, 2048, 8
LOOP = 200  # products per call
CALLS = 8


def products():
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.normal(size=(M, K)).astype(jnp.bfloat16))
    w = jax.device_put((rng.normal(size=(G, K, N)) / K**0.5).astype(jnp.bfloat16))
    w0 = w[0]
    sizes = jax.device_put(np.full(G, M // G, np.int32))
    dense_pallas = hopper_matmul_mgpu.TuningConfig(
        tile_m=128, tile_n=128, tile_k=64, max_concurrent_steps=4,
        wg_dimension=hopper_matmul_mgpu.MatmulDimension.N,
        cluster_dimension=hopper_matmul_mgpu.MatmulDimension.N)
    weight = jax.jit(fp8.quantize_weight)(w)
    x_q, x_scales = jax.jit(fp8.quantize_rows)(x)
    table = grouped.tuning.config_for(grouped.tuning.FP8, K, N, G)
    cluster = dataclasses.replace(table, cluster_n=2, across_tiles=False)

    def fp8_forward(config):
        # x stands in for its quantized rows (the loop's argument), so that the product is
        # the kernel alone.
        return lambda x: grouped.grouped_matmul_fp8(x_q, x_scales, weight.q_t, weight.scales_t,
                                                    sizes, config=config)

    return x, {
        "jep grouped forward": lambda x: grouped.grouped_matmul(x, w, sizes),
        "JAX dense Pallas matmul": lambda x: hopper_matmul_mgpu.matmul(x, w0, None,
                                                                       dense_pallas),
        "XLA dense matmul": lambda x: x @ w0,
        "jep FP8 forward": fp8_forward(table),
        "jep FP8 forward, cluster 2": fp8_forward(cluster),
    }


def main():
    x, fns = products()
    if sys.argv[1:]:
        fns = {name: fns[name] for name in sys.argv[1:]}
    spans = {}
    with tempfile.TemporaryDirectory() as folder:
        samples = f"{folder}/samples.csv"
        smi = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw",
             "--format=csv,noheader,nounits", "-lms", "100", "-i", "0", "-f", samples])
        try:
            for name, product in fns.items():
                loop = jax.jit(lambda x, product=product: lax.fori_loop(
                    0, LOOP, lambda i, total: total + product(x)[0, 0].astype(jnp.float32), 0.0))
                jax.block_until_ready(loop(x))
                start, times = time.time(), []
                for _ in range(CALLS):
                    begin = time.perf_counter()
                    jax.block_until_ready(loop(x))
                    times.append((time.perf_counter() - begin) / LOOP)
                spans[name] = (start, time.time(), float(np.median(times)))
        finally:
            smi.terminate()
            smi.wait()
        with open(samples) as lines:
            rows = [r for r in csv.reader(lines) if len(r) == 3]
    for name, (start, end, seconds) in spans.items():
        clocks, power = [], []
        for stamp, clock, watts in rows:
            when = time.mktime(time.strptime(stamp.strip()[:19], "%Y/%m/%d %H:%M:%S"))
            when += float("0" + stamp.strip()[19:])
            if start + 0.5 <= when <= end:  # past the first half second of each
                clocks.append(float(clock))
                power.append(float(watts))
        clock_range = f"{min(clocks):.0f}-{max(clocks):.0f} MHz" if clocks else "no samples"
        power_range = f"{min(power):.0f}-{max(power):.0f} W" if power else ""
        print(f"{name:26s} {seconds * 1e3:.3f} ms {2 * M * K * N / seconds / 1e12:6.0f} TFLOP/s"
              f"  SM clock {clock_range}  power {power_range}")


if __name__ == "__main__":
    main()
