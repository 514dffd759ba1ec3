"""Grouped GEMM: jep's grouped matmul (forward, dx, dw) against lax.ragged_dot and a dense matmul
of the same flops. Shapes M x K x N with G groups: y[M, N] = x[M, K] @ w[g][K, N] per group.

"jep" is `jep.grouped_matmul` with backend "auto" (each result names the backend it took: the
Pallas Mosaic GPU kernels of `jep_kernels.grouped_matmul` on a Hopper GPU). On a GPU it is
measured beside the grouped GEMMs JAX ships as examples
(`jax.experimental.pallas.ops.gpu`: `ragged_dot_mgpu` for the forward and dx,
`transposed_ragged_dot_mgpu` for dw; the configuration of `../shared/GPU.md`'s 521-524 TFLOP/s),
and tokamax's `ragged_dot` (its Mosaic GPU kernels, forward and both gradients) where tokamax is
installed (`pip install tokamax`; not a dependency of jep).

Every product also gets its roofline, from two ceilings measured in the same run: the time of the
dense matmul of the same flops, and the time its bytes take at the device's copy rate (the
faster of XLA's copy of a 1 GiB array and a loop of `a * c + 1` over it, bytes read + written). A grouped product must read its two
operands and write its result once, (M K + G K N + M N) elements whichever product it is, so

    roofline = max(dense matmul time, (M K + G K N + M N) * itemsize / copy rate)

and `vs_roofline` = roofline / measured time (1.0: at the roofline). Each variant also gets a
"dx + dw" row: the backward, the two products' times and rooflines summed.

In FP8 (DeepSeek-V3's recipe): "jep fp8" is `jep.experts.fp8_grouped_matmul` with the weight
quantized beforehand, x and dy in the loop, as a training step runs it; "jep fp8 kernels" the
FP8 kernels alone on operands all quantized beforehand (x as FP8 dispatch brings it);
"dense fp8" the dense product of the same flops on e4m3 operands without scales (XLA's choice
of GEMM on a GPU), the device's FP8 ceiling. Their rooflines are bf16's, so that "vs roofline" is each one's
speed-up on the bf16 ceiling.

jep and the dense matmul are always timed; the peers (`PEERS`) where asked (`peers`): on a
GPU each is a compile of its own per shape and product, and all of them for five large shapes
take longer than one 10-minute device call."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jep
import jep_kernels.grouped_matmul
from jep import experts, fp8
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


def _fp8_ops():
    """forward, dx and dw of `jep.experts.fp8_grouped_matmul` with the weight quantized
    beforehand (the rotations' fifth element); x and dy are quantized in the loop, by rows for
    the forward and dx, along the rows for dw."""
    def forward(x, w, dy, sizes, quantized):
        return experts.fp8_grouped_matmul(x, w, sizes, quantized=quantized)

    def dx(x, w, dy, sizes, quantized):
        return jax.vjp(lambda x: experts.fp8_grouped_matmul(x, w, sizes, quantized=quantized),
                       x)[1](dy)[0]

    def dw(x, w, dy, sizes, quantized):
        return jax.vjp(lambda w: experts.fp8_grouped_matmul(x, w, sizes, quantized=quantized),
                       w)[1](dy)[0]

    return {"forward": forward, "dx": dx, "dw": dw}


def _fp8_kernel_ops(interpret: bool = False):
    """forward, dx and dw of jep's FP8 kernels alone (`jep_kernels.grouped_matmul`'s
    `grouped_matmul_fp8` and `grouped_matmul_dw_fp8`), every operand quantized before the loop
    (the rotations' fifth element: the weight's `jep.fp8.QuantizedWeight`, x and dy by rows and
    along the rows). The experts get x so where FP8 dispatch brings it already quantized; dy is
    quantized in a training step, so "jep fp8" is the step's dx and dw. `interpret`: Pallas's
    interpret mode (the CPU, for tests)."""
    kernels = jep_kernels.grouped_matmul

    def forward(x, w, dy, sizes, q):
        return kernels.grouped_matmul_fp8(*q["x_rows"], q["w"].q_t, q["w"].scales_t, sizes,
                                          out_dtype=x.dtype, interpret=interpret)

    def dx(x, w, dy, sizes, q):
        return kernels.grouped_matmul_fp8(*q["dy_rows"], q["w"].q, q["w"].scales, sizes,
                                          out_dtype=x.dtype, interpret=interpret)

    def dw(x, w, dy, sizes, q):
        return kernels.grouped_matmul_dw_fp8(*q["x_columns"], *q["dy_columns"], sizes,
                                             num_rows=x.shape[0], out_dtype=w.dtype,
                                             interpret=interpret)

    return {"forward": forward, "dx": dx, "dw": dw}


def quantized_operands(x, dy, sizes, weight: fp8.QuantizedWeight) -> dict:
    """The operands of `_fp8_kernel_ops`: `weight` (`workloads.quantize_weight(w)`), and x and
    dy quantized by `jep.fp8`'s references, in one jit."""
    return _quantized_rows_and_columns(x, dy, sizes) | {"w": weight}


@jax.jit
def _quantized_rows_and_columns(x, dy, sizes):
    return {"x_rows": fp8.quantize_rows(x), "dy_rows": fp8.quantize_rows(dy),
            "x_columns": fp8.quantize_columns(x, sizes),
            "dy_columns": fp8.quantize_columns(dy, sizes)}


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


# The dense FP8 peer ("dense fp8"): the same flops as `DENSE`, its operands cast to e4m3
# before the loop, both K-major (as Hopper's FP8 tensor-core products read them; on a GPU XLA
# picks the GEMM: cuBLAS, or its own Triton GEMM at some shapes), without scales: what an FP8
# product reaches on the device, as "dense matmul" is for bf16. Each op's two operands
# [rows, depth] and [columns, depth], for `dense_fp8`.
@jax.jit
def dense_fp8_operands(x, w, dy):
    x8, w8, dy8 = (a.astype(jnp.float8_e4m3fn) for a in (x, w[0], dy))
    return {"forward": (x8, w8.T), "dx": (dy8, w8), "dw": (x8.T, dy8.T)}


def dense_fp8(a, b):
    """a [R, D] @ b [C, D]^T of e4m3 operands, K-major both: bf16[R, C]."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.bfloat16)


COPY_BYTES = 2**30
RAGGED_DOT_MAX_GROUPS = 32
# The variants besides jep and the dense matmul; "tokamax" and "jax.experimental.pallas.ops"
# run on GPUs only (and tokamax where installed), "jep fp8" where K and N are multiples of 128,
# "jep fp8 kernels" where the FP8 kernels run (Hopper).
PEERS = ("lax.ragged_dot", "tokamax", "jep fp8", "jep fp8 kernels", "dense fp8",
         "jax.experimental.pallas.ops")


def copy_rates(*, iters: int, repeats: int, size: int = COPY_BYTES, min_seconds: float = 0.0,
               seed: int = 0) -> dict[str, float]:
    """Bytes per second the device reads + writes over `size` bytes of random bf16, two ways:
    "copy" (XLA's copy of an array into a new one, one call a sample) and "a * c + 1" (a loop
    of `iters` element-wise updates in place). The larger is the memory ceiling of the
    rooflines: XLA's element-wise kernels stay well under the copy on an H200."""
    a = jax.random.normal(jax.random.key(seed), (size // 2,), jnp.bfloat16)

    def update(a):
        return lax.fori_loop(0, iters, lambda i, a: a * jnp.bfloat16(0.5) + 1, a)[0]

    runs = {"copy": (jax.jit(lambda a: jnp.copy(a)), (a,)), "a * c + 1": (jax.jit(update), (a,))}
    seconds = timing.seconds_interleaved(runs, iters=iters, repeats=repeats,
                                         min_seconds=min_seconds)
    seconds["copy"] *= iters  # one copy a call, not `iters`
    for value in seconds.values():
        if isinstance(value, Exception):
            raise value
    return {name: 2 * size / value for name, value in seconds.items()}


def product_bytes(m: int, k: int, n: int, g: int, itemsize: int) -> int:
    """The bytes any product of a grouped matmul must move: x, w and y (or dy, w and dx; or x,
    dy and dw) once each."""
    return (m * k + g * k * n + m * n) * itemsize


def add_rooflines(results: list[dict], bytes_per_second: float) -> list[dict]:
    """Sets `roofline_seconds` and `vs_roofline` on each grouped product of `results` (from the
    dense matmul of its shape and op, and the copy rate), and returns the "dx + dw" rows: each
    variant's backward, times and rooflines summed."""
    def key(r):
        return (r["m"], r["k"], r["n"], r["groups"], r["routing"])

    dense = {(key(r), r["op"]): r["seconds"] for r in results if r["variant"] == "dense matmul"}
    for r in results:
        r["roofline_seconds"] = r["vs_roofline"] = None
        if r["variant"] == "dense matmul" or dense.get((key(r), r["op"])) is None:
            continue
        moved = product_bytes(r["m"], r["k"], r["n"], r["groups"], r["itemsize"])
        r["roofline_seconds"] = max(dense[key(r), r["op"]], moved / bytes_per_second)
        if r["seconds"] is not None:
            r["vs_roofline"] = r["roofline_seconds"] / r["seconds"]
    backward = []
    for r in results:
        if r["op"] != "dx":
            continue
        dw = next((d for d in results if d["op"] == "dw" and d["variant"] == r["variant"]
                   and key(d) == key(r)), None)
        if dw is None:
            continue
        entry = {k: v for k, v in r.items() if k not in ("error", "backend")} | {
            "op": "dx + dw", "roofline_seconds": None, "vs_roofline": None}
        timed = r["seconds"] is not None and dw["seconds"] is not None
        entry["seconds"] = r["seconds"] + dw["seconds"] if timed else None
        entry["tflop_per_s"] = 4.0 * r["m"] * r["k"] * r["n"] / entry["seconds"] / 1e12 if timed else None
        if r["roofline_seconds"] is not None and dw["roofline_seconds"] is not None:
            entry["roofline_seconds"] = r["roofline_seconds"] + dw["roofline_seconds"]
            entry["vs_roofline"] = entry["roofline_seconds"] / entry["seconds"] if timed else None
        backward.append(entry)
    return backward


def measure(*, shapes, dtype, routing: str, iters: int, repeats: int,
            min_seconds: float = 0.0, seed: int = 0, peers=PEERS) -> list[dict]:
    if unknown := set(peers) - set(PEERS):
        raise ValueError(f"peers must be among {PEERS}, got {sorted(unknown)}")
    rng = np.random.default_rng(seed)
    # 1 GiB, well past the caches, on a GPU; a small array elsewhere (a CPU smoke run).
    copy_bytes = COPY_BYTES if jax.default_backend() == "gpu" else 2**22
    rates = copy_rates(iters=iters, repeats=repeats, size=copy_bytes, min_seconds=min_seconds)
    bytes_per_second = max(rates.values())
    variants = {"jep": jep.grouped_matmul}
    if "lax.ragged_dot" in peers:
        variants["lax.ragged_dot"] = lambda x, w, s: lax.ragged_dot(x, w, s)
    if ("tokamax" in peers and jax.default_backend() == "gpu"
            and (tokamax := _tokamax_ragged_dot()) is not None):
        variants["tokamax"] = tokamax
    results = []
    for m, k, n, g in shapes:
        rotations = workloads.gemm_operands(routing, rng, (m, k, n, g), dtype)
        flops = 2.0 * m * k * n
        jep_backend = experts.grouped_matmul_backend(*rotations[0][:2])

        runs, skipped = {}, {}

        def record(variant, op, body, rotations=rotations):
            run = jax.jit(lambda rotations: timing.repeat_rotated(body, rotations, iters))
            runs[variant, op] = (run, (rotations,))

        for variant, matmul in variants.items():
            for op, body in _ops(matmul).items():
                if variant == "lax.ragged_dot" and g > RAGGED_DOT_MAX_GROUPS:
                    skipped[variant, op] = ValueError(
                        f"not run past {RAGGED_DOT_MAX_GROUPS} groups: XLA's backward "
                        "materializes a product per group (56 GiB asked at 64)")
                else:
                    record(variant, op, body)
        kernels = ("jep fp8 kernels" in peers and experts.fp8_backend(
            rotations[0][0], rotations[0][1].shape) == "pallas")
        if k % fp8.TILE == 0 and n % fp8.TILE == 0 and ("jep fp8" in peers or kernels):
            # Each weight quantized before the loop, once for both FP8 variants (two copies of
            # a weight of 256 experts in FP8 are 15 GB).
            weights = [workloads.quantize_weight(r[1]) for r in rotations]
            if "jep fp8" in peers:  # x and dy quantized in the loop
                quantized = [(*r, weight) for r, weight in zip(rotations, weights)]
                for op, body in _fp8_ops().items():
                    record("jep fp8", op, body, quantized)
            if kernels:  # the FP8 kernels alone, where they run: every operand beforehand
                operands = [(*r, quantized_operands(r[0], r[2], r[3], weight))
                            for r, weight in zip(rotations, weights)]
                for op, body in _fp8_kernel_ops().items():
                    record("jep fp8 kernels", op, body, operands)
        if "jax.experimental.pallas.ops" in peers and jax.default_backend() == "gpu":
            for op, body in _jax_pallas_ops().items():
                record("jax.experimental.pallas.ops", op, body)
        for op, body in DENSE.items():
            record("dense matmul", op, body)
        if "dense fp8" in peers:
            operands = [dense_fp8_operands(*r[:3]) for r in rotations]
            for op in DENSE:
                record("dense fp8", op, dense_fp8, [o[op] for o in operands])
        # Every variant of the shape timed in turn, round by round (seconds_interleaved).
        timed = timing.seconds_interleaved(runs, iters=iters, repeats=repeats,
                                           min_seconds=min_seconds)
        for (variant, op), seconds in (timed | skipped).items():
            entry = {"suite": "gemm", "variant": variant, "op": op, "m": m, "k": k, "n": n,
                     "groups": g, "routing": routing, "itemsize": jnp.dtype(dtype).itemsize}
            if variant == "jep":
                entry["backend"] = jep_backend
            if isinstance(seconds, Exception):  # an out-of-memory peer is a result
                entry |= {"seconds": None, "tflop_per_s": None,
                          "error": str(seconds).splitlines()[0][:200]}
            else:
                entry |= {"seconds": seconds, "tflop_per_s": flops / seconds / 1e12}
            results.append(entry)
    results += add_rooflines(results, bytes_per_second)
    for r in results:
        dense = next(d for d in results if d["variant"] == "dense matmul" and d["op"] == r["op"]
                     and (d["m"], d["k"], d["n"], d["groups"]) == (r["m"], r["k"], r["n"], r["groups"]))
        r["vs_dense"] = (None if r["tflop_per_s"] is None or dense["tflop_per_s"] is None
                         else r["tflop_per_s"] / dense["tflop_per_s"])
    results += [{"suite": "gemm", "variant": "copy", "op": name, "bytes": copy_bytes,
                 "gb_per_s": rate / 1e9} for name, rate in rates.items()]
    return results
