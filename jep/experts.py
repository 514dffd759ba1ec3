"""Grouped expert FFN (SwiGLU) on the rows `dispatch` delivered: a grouped matmul per weight (on the
Pallas kernels the gate and up products' dx summed in one).

Shapes: C rows, H hidden, F expert hidden, G = E_local groups.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

import jep_kernels.grouped_matmul
import jep_kernels.grouped_matmul.reference
import jep_kernels.quantize
from jep import _checks, fp8
from jep_kernels.vma import vary_like, varying
from jep.config import ACTIVATIONS, PRECISIONS
from jep.platform import current_platform, on_hopper

ACTIVATION_FNS = jep_kernels.grouped_matmul.ACTIVATIONS


def _grouped_matmul_xla(x, w, group_sizes):
    # The product accumulates in float32 inside the kernel either way; asking for a float32
    # *result* would also make the backward products run in float32: 2-3x slower for bf16 on an
    # H200 (dx 53 against 97 TFLOP/s, dw 29 against 84; `python -m jep.bench gemm`).
    return lax.ragged_dot(x, w, group_sizes)


def _grouped_matmul_pallas(x, w, group_sizes):
    return jep_kernels.grouped_matmul.grouped_matmul(x, w, group_sizes)


def _pallas_takes(x, w) -> bool:
    """Whether the Pallas Mosaic GPU kernels run here and take these shapes: a Hopper GPU, bf16 or
    f16, K and N multiples of the kernel's 128-wide tiles."""
    tile = jep_kernels.grouped_matmul.SHAPE_MULTIPLE
    return (on_hopper() and x.dtype in (jnp.bfloat16, jnp.float16)
            and w.dtype == x.dtype and w.shape[1] % tile == 0 and w.shape[2] % tile == 0)


_BACKENDS = {"pallas": _grouped_matmul_pallas, "xla": _grouped_matmul_xla,
             "reference": jep_kernels.grouped_matmul.reference.grouped_matmul}


def grouped_matmul(x, w, group_sizes, *, backend: str = "auto"):
    """[C, N] in x.dtype, accumulated in float32 (float64 for float64 x): rows of group g times
    w[g]; rows past `sum(group_sizes)` give 0.

    Args:
      x: f[C, K], rows grouped contiguously, group 0 first.
      w: f[G, K, N].
      group_sizes: i32[G].
      backend: "auto" (the Pallas kernels where they run and take the shapes, else XLA's
        `lax.ragged_dot`), "pallas", "xla" or "reference".
    """
    return _BACKENDS[grouped_matmul_backend(x, w, backend)](x, w, group_sizes)


def grouped_matmul_backend(x, w, backend: str = "auto") -> str:
    """The backend `grouped_matmul(x, w, ..., backend=backend)` runs: `backend` itself, or for
    "auto" "pallas" where the kernels run and take the shapes, else "xla". Raises ValueError for
    an unknown backend, or "pallas" where it cannot run."""
    return _resolved(backend, _pallas_takes(x, w), lambda: (
        "backend='pallas' (jep_kernels.grouped_matmul, Pallas Mosaic GPU) needs a Hopper GPU, "
        f"bf16 or f16 x and w, and K and N multiples of 128; got x {x.dtype}{list(x.shape)}, "
        f"w {w.dtype}{list(w.shape)} on {current_platform()!r}. Use 'xla' or 'auto'."))


def _resolved(backend: str, pallas_takes: bool, refusal) -> str:
    """`backend`, or for "auto" "pallas" where `pallas_takes` else "xla"; a ValueError for an
    unknown backend, or for "pallas" where it cannot run (`refusal()` its message)."""
    if backend == "auto":
        return "pallas" if pallas_takes else "xla"
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {tuple(_BACKENDS)}, got {backend!r}")
    if backend == "pallas" and not pallas_takes:
        raise ValueError(refusal())
    return backend


def fp8_grouped_matmul(x, w, group_sizes, *, quantized=None, quantized_rows=None,
                       quantized_columns=None, backend: str = "auto"):
    """`grouped_matmul` in DeepSeek-V3's FP8 recipe: [C, N] in x.dtype.

    x is quantized to e4m3 with a scale per 1 x 128 tile of each row (`jep.fp8.quantize_rows`)
    and w with one per 128 x 128 block of each group's [K, N] (`jep.fp8.quantize_blocks`);
    y = x' @ w' of the dequantized values, accumulated in float32. The backward: dx = dy' @ w'^T
    with dy quantized per 1 x 128 tile and the same quantized w; dw[g] = x''^T dy'' over the
    group's rows, with x and dy quantized along the rows, a scale per 128 rows of one group x 1
    channel (`jep.fp8.quantize_columns`), in w's dtype, straight through the quantization to
    the master weights w. All three products are FP8, as DeepSeek-V3 trains.

    On a Hopper GPU (bf16, f16 or float32 x, `backend` "auto" or "pallas": `fp8_backend`), the
    three are FP8 tensor-core products (`jep_kernels.grouped_matmul`'s `grouped_matmul_fp8`
    and `grouped_matmul_dw_fp8`), their operands quantized by one-pass kernels
    (`jep_kernels.quantize`: rows where they are a multiple of 64, the same values as
    `jep.fp8.quantize_rows`, 2x faster than XLA's fusions of it on an H200 at 32768 x 7168;
    columns where x is bf16/f16 and its rows a multiple of 8), and w by the kernel that reads
    it once where it is bf16/f16 (XLA's fusions otherwise). The kernels' quotients at an e4m3
    tie may round either way (the GPU's division).
    Elsewhere the products are emulated: the e4m3 values and scales are exact and the products
    run in float32 (XLA's `ragged_dot`), the numerics of FP8 products, not their speed. Both
    sum each 128-deep block's products in float32 before scaling it.

    Args:
      x: f[C, K], K a multiple of 128; w: f[G, K, N], N a multiple of 128 (the master weights,
        which receive the gradient); group_sizes: i32[G].
      quantized: `jep.fp8.quantize_weight(w)` where already made (one quantization of a
        weight for several products, e.g. a layer's chunks, or before a timed loop), else
        made here.
      quantized_rows: `jep.fp8.quantize_rows(x)` (q e4m3[C, K], scales f32[C, K / 128]) where
        already made (one quantization of x for several products, e.g. the gate and up
        projections), else made here. x itself still receives the gradient.
      quantized_columns: `jep.fp8.quantize_columns(x, group_sizes)` (q_t e4m3[K, P], scales
        f32[P / 128, K]) where already made (as `quantized_rows`, for the weight gradient),
        else made in the backward.
      backend: "auto", "pallas" (the FP8 kernels; Hopper), "xla" or "reference" (emulated):
        `fp8_backend`.
    """
    _checks.rank(x, 2, "x")
    _checks.rank(w, 3, "w")
    if x.shape[1] != w.shape[1] or x.shape[1] % fp8.TILE or w.shape[2] % fp8.TILE:
        raise ValueError(f"FP8 products take x [C, K] and w [G, K, N] with K and N multiples of "
                         f"{fp8.TILE}, got x {list(x.shape)} and w {list(w.shape)}")
    fp8_backend(x, w.shape, backend)  # refuses a backend that cannot run here
    if quantized is None:
        quantized = _quantize_weight(w, x, backend)
    if not isinstance(quantized, fp8.QuantizedWeight):
        raise TypeError(f"quantized must be a jep.fp8.QuantizedWeight (jep.fp8.quantize_weight), "
                        f"got {type(quantized).__name__}")
    if quantized_rows is not None:
        _check_quantized(quantized_rows, "quantized_rows", "jep.fp8.quantize_rows",
                         (x.shape, (x.shape[0], x.shape[1] // fp8.TILE)))
    if quantized_columns is not None:
        padded = fp8.padded_rows(x.shape[0], group_sizes.shape[0])
        _check_quantized(quantized_columns, "quantized_columns", "jep.fp8.quantize_columns",
                         ((x.shape[1], padded), (padded // fp8.TILE, x.shape[1])))
    return _fp8_products(x, (w,), (quantized,), quantized_rows, quantized_columns, group_sizes,
                         backend)[0]


def _check_quantized(quantized, name: str, maker: str, shapes) -> None:
    """Raises a ValueError unless `quantized` is (e4m3 values, f32 scales) of `shapes`."""
    want = tuple(zip(shapes, (fp8.E4M3, jnp.float32)))
    if not (isinstance(quantized, tuple) and len(quantized) == 2 and all(
            a.shape == shape and a.dtype == dtype for a, (shape, dtype) in
            zip(quantized, want))):
        got = (f"({', '.join(f'{a.dtype}{list(a.shape)}' for a in quantized)})"
               if isinstance(quantized, tuple) else type(quantized).__name__)
        raise ValueError(f"{name} must be (q float8_e4m3fn{list(shapes[0])}, scales "
                         f"float32{list(shapes[1])}) ({maker}), got {got}")


def _quantize_weight(w, rows, backend: str) -> fp8.QuantizedWeight:
    """`jep.fp8.quantize_weight(w)`, out of the gradient's way: by the kernel that reads w once
    (`jep_kernels.quantize.quantize_weight`, 2.2x faster than XLA's fusions on an H200 at
    [256, 7168, 2048]) where the FP8 products of `rows` run on the Pallas kernels and it takes w,
    else by XLA's fusions of the reference."""
    w = lax.stop_gradient(w)
    if _runs_fp8_kernel(rows, w.shape, backend) and jep_kernels.quantize.weight_kernel_takes(w):
        return fp8.QuantizedWeight(*jep_kernels.quantize.quantize_weight(w))
    return fp8.quantize_weight(w)


def fp8_backend(rows, w_shape, backend: str = "auto") -> str:
    """The backend `fp8_grouped_matmul(rows, w, ..., backend=backend)` runs for w of `w_shape`
    [G, K, N]: `backend` itself, or for "auto" "pallas" (the FP8 kernels) where they run and
    take the shapes, else "xla" (emulated). The FP8 kernels run on a Hopper GPU for bf16, f16
    or float32 rows (their products' inputs are e4m3 whatever the rows' dtype; float32 rows
    take XLA's quantization along the rows, and float32 weights XLA's weight quantization),
    with K and N multiples of 128. Raises ValueError for an unknown backend, or "pallas" where
    it cannot run."""
    takes = (on_hopper() and rows.dtype in (jnp.bfloat16, jnp.float16, jnp.float32)
             and w_shape[1] % fp8.TILE == 0 and w_shape[2] % fp8.TILE == 0)
    return _resolved(backend, takes, lambda: (
        "backend='pallas' (the FP8 kernels, Pallas Mosaic GPU) needs a Hopper GPU, bf16, f16 "
        f"or float32 rows, and K and N multiples of {fp8.TILE}; got rows "
        f"{rows.dtype}{list(rows.shape)}, w {list(w_shape)} on {current_platform()!r}. Use "
        "'xla' or 'auto'."))


def _runs_fp8_kernel(rows, w_shape, backend: str) -> bool:
    """Whether the FP8 products of `rows` with a weight of `w_shape` run on the FP8 kernels."""
    return fp8_backend(rows, w_shape, backend) == "pallas"


def _quantize_rows(a, group_sizes, kernel: bool):
    """`jep.fp8.quantize_rows(a)` for products of the rows of `group_sizes`: by the one-pass
    kernel where the products run on the Pallas kernels (`kernel`) and it takes the rows (a
    multiple of 64 of them), which skips the blocks of rows past the groups (no product reads
    them into its output), else by XLA's fusions of the reference."""
    if kernel and jep_kernels.quantize.kernel_takes(a):
        return jep_kernels.quantize.quantize_rows(a, group_sizes)
    return fp8.quantize_rows(a)


def _quantize_columns(a, group_sizes, kernel: bool):
    """`jep.fp8.quantize_columns(a, group_sizes)`: by the one-pass kernel where the products run
    on the Pallas kernels (`kernel`) and it takes the rows, else by XLA's fusions of the
    reference."""
    if kernel and jep_kernels.quantize.columns_kernel_takes(a):
        return jep_kernels.quantize.quantize_columns(a, group_sizes)
    return fp8.quantize_columns(a, group_sizes)


def _fp8_weight_gradient(x_columns, dy_columns, group_sizes, num_rows: int, w, kernel: bool):
    """dw [G, K, N] in w's dtype from x and dy quantized along the rows: the FP8 kernel
    (`kernel`), else in float32 from the dequantized values. Inside `shard_map`, summed over
    the mesh axes the rows vary over and w does not (w's data-parallel copies), as the
    cotangent of w."""
    if kernel:
        dw = jep_kernels.grouped_matmul.grouped_matmul_dw_fp8(
            *x_columns, *dy_columns, group_sizes, num_rows=num_rows, out_dtype=w.dtype)
    else:
        x32, dy32 = (fp8.dequantize_columns(*columns, group_sizes, num_rows, jnp.float32)
                     for columns in (x_columns, dy_columns))
        # The product's transpose in w (at w = 0: it is linear), w typed as varying like the
        # rows, so that nothing is summed here.
        zeros = vary_like(jnp.zeros(w.shape, jnp.float32), x32, dy32)
        _, pullback = jax.vjp(lambda v: lax.ragged_dot(x32, v, group_sizes,
                                                       precision=lax.Precision.HIGHEST), zeros)
        dw = pullback(dy32)[0].astype(w.dtype)
    return _dp_summed(dw, w)


def _dp_summed(dw, w):
    """dw summed over the mesh axes it varies over and w does not (w's data-parallel copies),
    typed as w: the cotangent of w inside `shard_map`."""
    copies = tuple(sorted(varying(dw) - varying(w)))
    if copies:
        dw = lax.psum(dw, copies)
    return vary_like(dw, w)


def _fp8_times(a, b_q, b_scales, group_sizes, backend: str, a_quantized=None):
    """a quantized per 1 x 128 tile (`a_quantized`, else made here), times b^T (b e4m3[G, N, K]
    K-major, scaled per 128 x 128 block): [C, N] in a.dtype. The FP8 Pallas kernel where they
    run (`fp8_backend`), else in float32. With sequences for a, b_q and b_scales (a_quantized None):
    the sum of their products, rounded once (on the Pallas kernels, one kernel)."""
    summed = isinstance(a, tuple)
    as_, b_qs, b_scales = (tuple(v) if summed else (v,) for v in (a, b_q, b_scales))
    kernel = _runs_fp8_kernel(as_[0], b_qs[0].shape, backend)
    quantized = ((a_quantized,) if a_quantized is not None
                 else tuple(_quantize_rows(one, group_sizes, kernel) for one in as_))
    dtype = as_[0].dtype
    if kernel:  # one product is a sum of one
        a_qs, a_scales = (tuple(part) for part in zip(*quantized))
        return jep_kernels.grouped_matmul.grouped_matmul_fp8(a_qs, a_scales, b_qs, b_scales,
                                                             group_sizes, out_dtype=dtype)
    total = 0
    for (a_q, a_scale), q, scale in zip(quantized, b_qs, b_scales):
        a32 = fp8.dequantize_rows(a_q, a_scale, jnp.float32)
        b32 = jnp.swapaxes(fp8.dequantize_blocks(q, scale, jnp.float32), 1, 2)
        total = total + lax.ragged_dot(a32, b32, group_sizes, precision=lax.Precision.HIGHEST)
    return total.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _fp8_products(x, ws, quantized, x_rows, x_columns, group_sizes, backend):
    """x @ ws[i] in FP8 for each weight (`fp8_grouped_matmul`), x quantized once for all (by
    rows `x_rows` and along the rows `x_columns` where given, else made here): a tuple. The
    backward's dx, the sum over the weights of dy[i] @ ws[i]^T, is one FP8 product on the
    Pallas kernels (the gate and up projections' dx written once)."""
    if x_rows is None:
        x_rows = _quantize_rows(x, group_sizes, _runs_fp8_kernel(x, ws[0].shape, backend))
    return tuple(_fp8_times(x, q.q_t, q.scales_t, group_sizes, backend, x_rows)
                 for q in quantized)


def _fp8_products_fwd(x, ws, quantized, x_rows, x_columns, group_sizes, backend):
    return (_fp8_products(x, ws, quantized, x_rows, x_columns, group_sizes, backend),
            (x, ws, quantized, x_columns, group_sizes))


def _fp8_products_bwd(backend, residuals, dys):
    return _fp8_cotangents(backend, *residuals, dys)


def _fp8_cotangents(backend, x, ws, quantized, x_columns, group_sizes, dys):
    """The cotangents of (x, ws, quantized, x_rows, x_columns, group_sizes) for those `dys` of
    the products x @ ws[i]: dx one FP8 product summing all, each dw its own FP8 product."""
    dys = tuple(dy.astype(x.dtype) for dy in dys)
    dx = _fp8_times(dys, tuple(q.q for q in quantized), tuple(q.scales for q in quantized),
                    group_sizes, backend)
    kernel = _runs_fp8_kernel(x, ws[0].shape, backend)
    if x_columns is None:
        x_columns = _quantize_columns(x, group_sizes, kernel)
    dy_columns = tuple(_quantize_columns(dy, group_sizes, kernel) for dy in dys)
    groups, k, n = ws[0].shape
    if kernel and len(ws) == 2 and jep_kernels.grouped_matmul.tuning.entry_for(
            "dw_fp8_pair", k, n, groups) is not None:
        # Both weight gradients in one kernel, where the tuning table has it (where it beat
        # two kernels).
        dws = jep_kernels.grouped_matmul.grouped_matmul_dw_fp8(
            *x_columns, [q for q, _ in dy_columns], [s for _, s in dy_columns], group_sizes,
            num_rows=x.shape[0], out_dtype=ws[0].dtype)
        return dx, tuple(_dp_summed(dw, w) for dw, w in zip(dws, ws)), None, None, None, None
    dws = tuple(_fp8_weight_gradient(x_columns, columns, group_sizes, x.shape[0], w, kernel)
                for columns, w in zip(dy_columns, ws))
    return dx, dws, None, None, None, None


_fp8_products.defvjp(_fp8_products_fwd, _fp8_products_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _fp8_gated(x, ws, quantized, x_rows, x_columns, group_sizes, activation, backend):
    """act(x @ ws[0]) * (x @ ws[1]) in FP8, both products and the activation in one kernel
    (`jep_kernels.grouped_matmul.grouped_matmul_fp8_gated`: Hopper only), x quantized
    beforehand (`x_rows`, and `x_columns` for the weight gradients); the backward is
    `_fp8_products`' after the activation's gradient (by XLA, from the kernel's gate and up)."""
    return _fp8_gated_fwd(x, ws, quantized, x_rows, x_columns, group_sizes, activation,
                          backend)[0]


def _fp8_gated_fwd(x, ws, quantized, x_rows, x_columns, group_sizes, activation, backend):
    h, gate, up = jep_kernels.grouped_matmul.grouped_matmul_fp8_gated(
        *x_rows, quantized[0].q_t, quantized[0].scales_t, quantized[1].q_t,
        quantized[1].scales_t, group_sizes, activation=activation, out_dtype=x.dtype)
    return h, (x, ws, quantized, x_columns, group_sizes, gate, up)


def _fp8_gated_bwd(activation, backend, residuals, dh):
    *residuals, gate, up = residuals
    _, pullback = jax.vjp(lambda g, u: _activate(g, u, activation, dh.dtype), gate, up)
    return _fp8_cotangents(backend, *residuals, pullback(dh))


_fp8_gated.defvjp(_fp8_gated_fwd, _fp8_gated_bwd)


def expert_ffn(recv_x, group_sizes, w_gate, w_up, w_down, *, activation: str = "silu",
               backend: str = "auto", precision: str = "bf16"):
    """SwiGLU experts over grouped rows: `(act(x @ w_gate[g]) * (x @ w_up[g])) @ w_down[g]`.

    Args:
      recv_x: f[C, H], the rows of local expert 0, then 1, ... (`jep.dispatch`'s output).
      group_sizes: i32[G], rows per expert; rows past their sum give zero.
      w_gate, w_up: f[G, H, F]; w_down: f[G, F, H].
      activation: "silu" (SwiGLU), "gelu" or "relu".
      backend: grouped-matmul backend, "auto", "pallas" (Hopper), "xla" (`lax.ragged_dot`) or
        "reference".
      precision: "bf16", the products in recv_x's dtype; or "fp8", each product as
        `fp8_grouped_matmul` (H and F multiples of 128), each weight quantized once.

    Returns:
      [C, H] in recv_x.dtype; products accumulate in float32.
    """
    _check_args(recv_x, group_sizes, w_gate, w_up, w_down, activation, precision)
    return _swiglu(_matmul_of(precision, backend, group_sizes), recv_x, w_gate, w_up, w_down,
                   activation, _hidden_of(precision, backend, recv_x, w_gate, [group_sizes]))


def _hidden_of(precision: str, backend: str, rows, w_gate, group_sizes):
    """act(rows @ w_gate) * (rows @ w_up) in as few kernels as the bf16 Pallas kernels allow:
    `hidden(rows, (w_gate, w_up), activation)`; rows one array or a tuple of chunks
    (group_sizes a list of the chunks' sizes). Where the tuning table has a "gated" entry for
    w_gate's shape, both products and the activation in one kernel a chunk
    (`jep_kernels.grouped_matmul.grouped_matmul_gated`); else the two products in one call
    whose dx is one kernel (`grouped_matmul_weights`) and the activation by XLA. None where
    the Pallas kernels do not run (a product a weight).

    In FP8, each chunk's rows are quantized once for both products (`_fp8_hidden`)."""
    if precision == "fp8":
        return functools.partial(_fp8_hidden, backend=backend, group_sizes=group_sizes)
    if grouped_matmul_backend(rows, w_gate.astype(rows.dtype), backend) != "pallas":
        return None
    groups, k, n = w_gate.shape
    gated = jep_kernels.grouped_matmul.tuning.entry_for("gated", k, n, groups) is not None

    def hidden(rows, weights, activation):
        chunks = rows if isinstance(rows, tuple) else (rows,)
        if gated:
            hs = jep_kernels.grouped_matmul.grouped_matmul_gated(
                chunks, *weights, group_sizes, activation=activation)
        else:
            gates, ups = jep_kernels.grouped_matmul.grouped_matmul_weights(
                chunks, weights, group_sizes)
            hs = tuple(_activate(g, u, activation, g.dtype) for g, u in zip(gates, ups))
        return hs if isinstance(rows, tuple) else hs[0]

    return hidden


def _fp8_hidden(rows, weights, activation, *, backend, group_sizes):
    """act(rows @ w_gate) * (rows @ w_up) in FP8 (`fp8_grouped_matmul`), rows an array or a
    tuple of chunks (group_sizes a list of the chunks' sizes): each weight quantized once for
    all chunks, each chunk's rows once for both products (by rows for the products, along
    the rows for their weight gradients: in the forward, where the backward would take it
    twice), and each chunk's dx of both one product (`_fp8_products`). On Hopper, where the
    tuning table has an "fp8_gated" entry for the shape, both products and the activation are
    one kernel a chunk (`_fp8_gated`)."""
    chunks = rows if isinstance(rows, tuple) else (rows,)
    weights = tuple(weights)
    quantized = tuple(_quantize_weight(w, chunks[0], backend) for w in weights)
    groups, k, n = weights[0].shape
    # The gated kernel where the tuning table has it (where it beat the products apart).
    gated = jep_kernels.grouped_matmul.tuning.entry_for("fp8_gated", k, n, groups) is not None
    hs = []
    for chunk, sizes in zip(chunks, group_sizes):
        kernel = _runs_fp8_kernel(chunk, weights[0].shape, backend)
        fixed = lax.stop_gradient(chunk)
        chunk_rows = _quantize_rows(fixed, sizes, kernel)
        chunk_columns = _quantize_columns(fixed, sizes, kernel)
        if kernel and gated:
            hs.append(_fp8_gated(chunk, weights, quantized, chunk_rows, chunk_columns, sizes,
                                 activation, backend))
            continue
        gate, up = _fp8_products(chunk, weights, quantized, chunk_rows, chunk_columns, sizes,
                                 backend)
        hs.append(_activate(gate, up, activation, chunk.dtype))
    return tuple(hs) if isinstance(rows, tuple) else hs[0]


def _activate(gate, up, activation, dtype):
    """act(gate) * up in `dtype`, computed in float32 (float64 for float64 rows)."""
    accumulator = jep_kernels.grouped_matmul.reference.accumulator(jnp.zeros((), dtype))
    return (ACTIVATION_FNS[activation](gate.astype(accumulator))
            * up.astype(accumulator)).astype(dtype)


def _matmul_of(precision: str, backend: str, group_sizes):
    """The grouped product `_swiglu` takes: matmul(rows, w), rows an array or a tuple of chunks
    (group_sizes then a tuple too); in FP8 each weight is quantized once for all chunks."""
    if precision == "bf16":
        return functools.partial(grouped_matmul, group_sizes=group_sizes, backend=backend)

    def matmul(rows, w):
        quantized = _quantize_weight(w, rows[0] if isinstance(rows, tuple) else rows, backend)
        if not isinstance(rows, tuple):
            return fp8_grouped_matmul(rows, w, group_sizes, quantized=quantized, backend=backend)
        return tuple(fp8_grouped_matmul(r, w, sizes, quantized=quantized, backend=backend)
                     for r, sizes in zip(rows, group_sizes))

    return matmul


def _check_args(recv_x, group_sizes, w_gate, w_up, w_down, activation, precision="bf16"):
    _checks.rank(recv_x, 2, "recv_x")
    _checks.floating(recv_x, "recv_x")
    _checks.rank(group_sizes, 1, "group_sizes")
    _checks.integer(group_sizes, "group_sizes")
    num_groups, hidden = group_sizes.shape[0], recv_x.shape[1]
    _checks.rank(w_gate, 3, "w_gate")
    ffn = w_gate.shape[2]
    _checks.shape(w_gate, (num_groups, hidden, ffn), "w_gate")
    _checks.shape(w_up, (num_groups, hidden, ffn), "w_up")
    _checks.shape(w_down, (num_groups, ffn, hidden), "w_down")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp8" and (hidden % fp8.TILE or ffn % fp8.TILE):
        raise ValueError(f"precision='fp8' quantizes tiles of {fp8.TILE} channels: H ({hidden}) "
                         f"and F ({ffn}) must be multiples of {fp8.TILE}")


def _swiglu(matmul, rows, w_gate, w_up, w_down, activation, hidden_of=None):
    """`(act(rows @ w_gate) * (rows @ w_up)) @ w_down` with `matmul(rows, w)` the grouped product;
    `rows` an array, or a tuple of arrays (chunks) for a `matmul` that takes them;
    `hidden_of(rows, (w_gate, w_up), activation)` the first half in fewer kernels where given
    (`_hidden_of`)."""
    first = rows[0] if isinstance(rows, tuple) else rows
    dtype = first.dtype
    weights = (w_gate.astype(dtype), w_up.astype(dtype))
    if hidden_of is not None:
        hidden = hidden_of(rows, weights, activation)
    else:
        gate, up = (matmul(rows, w) for w in weights)
        hidden = jax.tree.map(lambda g, u: _activate(g, u, activation, dtype), gate, up)
    return matmul(hidden, w_down.astype(dtype))


def expert_ffn_chunks(recv_xs, group_sizes, w_gate, w_up, w_down, *, activation: str = "silu",
                      backend: str = "auto", precision: str = "bf16"):
    """`expert_ffn` of each chunk of a layer run in chunks (`DispatchConfig(num_chunks)`): a
    tuple of [C_c, H], chunk c's rows recv_xs[c] grouped by group_sizes[c].

    With the Pallas kernels, each weight's gradient is computed once over the rows of every
    chunk (`jep_kernels.grouped_matmul.grouped_matmul_chunks`), not once per chunk and summed:
    chunking does not multiply the weight-gradient work. Elsewhere, one `expert_ffn` a chunk;
    in FP8 (`precision`) each weight is quantized once for all chunks, and each chunk's weight
    gradient is its own (quantized along the chunk's rows of each group, then summed).
    """
    recv_xs, group_sizes = tuple(recv_xs), tuple(group_sizes)
    if not recv_xs or len(recv_xs) != len(group_sizes):
        raise ValueError(f"recv_xs and group_sizes must be as many chunks (at least one), got "
                         f"{len(recv_xs)} and {len(group_sizes)}")
    for x, sizes in zip(recv_xs, group_sizes):
        _check_args(x, sizes, w_gate, w_up, w_down, activation, precision)
    if precision == "fp8":
        return _swiglu(_matmul_of(precision, backend, group_sizes), recv_xs, w_gate, w_up,
                       w_down, activation,
                       _hidden_of(precision, backend, recv_xs[0], w_gate, group_sizes))
    if grouped_matmul_backend(recv_xs[0], w_gate.astype(recv_xs[0].dtype), backend) != "pallas":
        return tuple(expert_ffn(x, sizes, w_gate, w_up, w_down, activation=activation,
                                backend=backend) for x, sizes in zip(recv_xs, group_sizes))

    def matmul(rows, w):
        return jep_kernels.grouped_matmul.grouped_matmul_chunks(rows, w, group_sizes)

    return _swiglu(matmul, recv_xs, w_gate, w_up, w_down, activation,
                   _hidden_of(precision, backend, recv_xs[0], w_gate, group_sizes))
