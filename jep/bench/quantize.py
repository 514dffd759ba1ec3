"""The experts' weights quantized to FP8, as each step of an FP8 layer does it (issue 21), on one
device: `jep.fp8.quantize_weight` (XLA's fusions: a pass for the scales, then one that writes
both layouts) against the kernel that reads each weight once (`jep_kernels.quantize`, Hopper,
bf16/f16 weights whose K and N are multiples of 128).

Weights: a layer's gate/up shape [E, H, F] and its down shape [E, F, H]. Bytes = the weight read
once and its two e4m3 layouts written (the scales, 1/16384 of that, left out): 2 bytes an element
for bf16, 4 in all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jep_kernels.quantize
from jep import fp8
from jep.bench import timing
from jep.platform import on_hopper

VARIANTS = ("jep.fp8 (XLA)", "jep kernel")


def measure(*, hidden: int, ffn: int, experts: int, dtype, iters: int, repeats: int,
            seed: int = 0) -> list[dict]:
    results = []
    key = jax.random.key(seed)
    for shape in ((experts, hidden, ffn), (experts, ffn, hidden)):
        # Drawn on the device: DeepSeek-V3's weights are 3.8 G elements.
        w = jax.random.normal(jax.random.fold_in(key, shape[1]), shape, jnp.float32).astype(dtype)
        quantizers = {VARIANTS[0]: fp8.quantize_weight}
        if on_hopper() and jep_kernels.quantize.weight_kernel_takes(w):
            quantizers[VARIANTS[1]] = jep_kernels.quantize.quantize_weight
        runs = {name: (jax.jit(lambda w, quantize=quantize: timing.repeat_rotated(
                           lambda w: tuple(quantize(w)), [(w,)], iters)), (w,))
                for name, quantize in quantizers.items()}
        timed = timing.seconds_interleaved(runs, iters=iters, repeats=repeats)
        moved = w.size * (jnp.dtype(dtype).itemsize + 2)
        for name, seconds in timed.items():
            entry = {"suite": "quantize", "variant": name, "op": "weight, both layouts",
                     "shape": list(shape), "bytes": moved}
            if isinstance(seconds, Exception):
                entry |= {"seconds": None, "gb_per_s": None,
                          "error": str(seconds).splitlines()[0][:200]}
            else:
                entry |= {"seconds": seconds, "gb_per_s": moved / seconds / 1e9}
            results.append(entry)
        del w
    return results
