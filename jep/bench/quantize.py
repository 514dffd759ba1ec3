"""FP8 quantization as each step of an FP8 layer does it (issue 21), on one device, XLA's
fusions (`jep.fp8`) against the kernels (`jep_kernels.quantize`, Hopper):

- the experts' weights: `jep.fp8.quantize_weight` (a pass for the scales, then one that writes
  both layouts) against the kernel that reads each weight once (bf16/f16, K and N multiples of
  128). A layer's gate/up shape [E, H, F] and its down shape [E, F, H]. Bytes = the weight read
  once and its two e4m3 layouts written (the scales, 1/16384 of that, left out): 2 bytes an
  element for bf16, 4 in all.
- token rows [T, H] for each of `tokens`: `jep.fp8.quantize_rows` against the rows kernel (and
  the kernel over a buffer whose groups fill an eighth of its rows, as a dropless buffer under
  EP=8 is filled: it skips the rest), and
  FP8 dispatch's `jep.fp8.pack_rows` (rows and scales packed into one row each) against the
  kernel storing into the packed rows (`jep_kernels.quantize.pack_rows`), where H is a
  multiple of 1024, the scales' bytes stored by an XLA pass after it (its default) and by the
  kernel itself. Bytes = x read, the e4m3 rows and their scales written.
- the same rows as a weight gradient's operand, in `groups` equal groups:
  `jep.fp8.quantize_columns` (a scale per 128 rows of a group x 1 channel, transposed) against
  its kernel, in blocks of 64 channels (its default) and of 128, with 2-4 blocks in flight
  (stages; the weights' kernel likewise, and with one slot for its stores instead of two).
  Bytes = x read,
  the e4m3 layout (padded to whole tiles a group) and its scales written.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import jep_kernels.quantize
from jep import fp8
from jep.bench import timing
from jep.platform import on_hopper

VARIANTS = ("jep.fp8 (XLA)", "jep kernel")


def _timed(runs, *, iters, repeats, about, moved):
    """Each of `runs` timed interleaved, as entries of `about` with bytes `moved`."""
    results = []
    for name, seconds in timing.seconds_interleaved(runs, iters=iters, repeats=repeats).items():
        entry = {"suite": "quantize", "variant": name, **about, "bytes": moved}
        if isinstance(seconds, Exception):
            entry |= {"seconds": None, "gb_per_s": None,
                      "error": str(seconds).splitlines()[0][:200]}
        else:
            entry |= {"seconds": seconds, "gb_per_s": moved / seconds / 1e9}
        results.append(entry)
    return results


def measure_rows(*, tokens, hidden: int, dtype, iters: int, repeats: int, groups: int = 32,
                 seed: int = 0) -> list[dict]:
    results = []
    for count in tokens if hidden % fp8.TILE == 0 else ():
        x = jax.random.normal(jax.random.key(seed + count), (count, hidden),
                              jnp.float32).astype(dtype)
        quantizers = {VARIANTS[0]: fp8.quantize_rows, "jep.fp8.pack_rows (XLA)": fp8.pack_rows}
        if on_hopper() and jep_kernels.quantize.kernel_takes(x):
            quantizers[VARIANTS[1]] = jep_kernels.quantize.quantize_rows
        if on_hopper() and jep_kernels.quantize.pack_kernel_takes(x):
            quantizers["jep kernel into packed rows"] = jep_kernels.quantize.pack_rows
            quantizers["jep kernel into packed rows, tails by the kernel"] = functools.partial(
                jep_kernels.quantize.pack_rows, tails="kernel")
        runs = {name: (jax.jit(lambda x, quantize=quantize: timing.repeat_rotated(
                           quantize, [(x,)], iters)), (x,))
                for name, quantize in quantizers.items()}
        moved = x.size * (jnp.dtype(dtype).itemsize + 1) + 4 * x.size // fp8.TILE
        results += _timed(runs, iters=iters, repeats=repeats, moved=moved,
                          about={"op": "rows", "shape": [count, hidden]})
        if VARIANTS[1] in quantizers:
            # An expert-side buffer under EP=8, dropless: the groups fill an eighth of its rows,
            # and the kernel skips the rest. Bytes: those of the rows it quantizes.
            filled = jnp.full((groups,), count // 8 // groups, jnp.int32)
            runs = {f"{VARIANTS[1]}, the groups' rows ({groups} groups, 1/8 of the buffer)": (
                jax.jit(lambda x: timing.repeat_rotated(
                    lambda x: jep_kernels.quantize.quantize_rows(x, filled), [(x,)], iters)),
                (x,))}
            results += _timed(runs, iters=iters, repeats=repeats,
                              moved=moved * int(filled.sum()) // count,
                              about={"op": "rows", "shape": [count, hidden]})
        sizes = jnp.full((groups,), count // groups, jnp.int32)
        quantizers = {VARIANTS[0]: fp8.quantize_columns}
        if on_hopper() and jep_kernels.quantize.columns_kernel_takes(x):
            quantizers[VARIANTS[1]] = jep_kernels.quantize.quantize_columns
            quantizers["jep kernel, 128-channel blocks"] = functools.partial(
                jep_kernels.quantize.quantize_columns, channels=128)
            quantizers["jep kernel, 4 stages"] = functools.partial(
                jep_kernels.quantize.quantize_columns, stages=4)
        runs = {name: (jax.jit(lambda x, quantize=quantize: timing.repeat_rotated(
                           lambda x: quantize(x, sizes), [(x,)], iters)), (x,))
                for name, quantize in quantizers.items()}
        padded = fp8.padded_rows(count, groups)
        moved = x.size * jnp.dtype(dtype).itemsize + padded * hidden + 4 * padded * hidden // fp8.TILE
        results += _timed(runs, iters=iters, repeats=repeats, moved=moved,
                          about={"op": f"columns, {groups} groups", "shape": [count, hidden]})
    return results


def measure(*, tokens, hidden: int, ffn: int, experts: int, dtype, iters: int, repeats: int,
            seed: int = 0) -> list[dict]:
    results = measure_rows(tokens=tokens, hidden=hidden, dtype=dtype, iters=iters,
                           repeats=repeats, groups=experts, seed=seed)
    key = jax.random.key(seed)
    for shape in ((experts, hidden, ffn), (experts, ffn, hidden)):
        # Drawn on the device: DeepSeek-V3's weights are 3.8 G elements.
        w = jax.random.normal(jax.random.fold_in(key, shape[1]), shape, jnp.float32).astype(dtype)
        quantizers = {VARIANTS[0]: fp8.quantize_weight}
        if on_hopper() and jep_kernels.quantize.weight_kernel_takes(w):
            quantizers[VARIANTS[1]] = jep_kernels.quantize.quantize_weight
            for stages in (2, 3):  # blocks in flight a program (4 by default)
                quantizers[f"jep kernel, {stages} stages"] = functools.partial(
                    jep_kernels.quantize.quantize_weight, stages=stages)
            for stages in (2, 3):  # one store slot: two programs a multiprocessor with 2 stages
                quantizers[f"jep kernel, one store slot, {stages} stages"] = functools.partial(
                    jep_kernels.quantize.quantize_weight, stages=stages, buffers=1)
        runs = {name: (jax.jit(lambda w, quantize=quantize: timing.repeat_rotated(
                           lambda w: tuple(quantize(w)), [(w,)], iters)), (w,))
                for name, quantize in quantizers.items()}
        results += _timed(runs, iters=iters, repeats=repeats,
                          moved=w.size * (jnp.dtype(dtype).itemsize + 2),
                          about={"op": "weight, both layouts", "shape": list(shape)})
        del w
    return results
