"""FP8 (e4m3) quantization as DeepSeek-V3 trains with it: a float32 scale per tile.

Activations take a scale per 1 x 128 tile (one token, 128 channels), weights one per 128 x 128
block, each the tile's max-abs over e4m3's largest value (448), so the tile's largest entry maps
to +-448 and the others to the nearest e4m3 value of theirs over the scale:

    q = e4m3(x / scale), x ~ q * scale,   scale = max|tile| / 448   (or the power of two at or
                                          above it, with power_of_two_scales: then scaling is
                                          exact and only the e4m3 rounding errs)

Round trip error per element: at most |x| / 16 (half an e4m3 ulp, 3 mantissa bits) for values
in e4m3's normal range, and at most scale * 2^-10 (half the smallest subnormal) below it. A tile
of zeros has scale 1 and quantizes to zeros. A tile holding inf or nan is not refused (the
values are traced): it gets an inf or nan scale and dequantizes to nan throughout.

Checkpoints store the weights' `scale` as `weight_scale_inv` (the multiplier that dequantizes:
DeepSeek-V3's HF weights), [ceil(rows / 128), ceil(cols / 128)] for a [rows, cols] weight.

A weight gradient's operands (dw[g] = x[rows of g]^T dy[rows of g], the rows the contraction)
take a scale per 128 rows of one group x 1 channel instead (`quantize_columns`), each group's
rows from a tile of their own, stored transposed as Hopper's FP8 products read them.

This is the reference (jnp, runs everywhere): what the FP8 kernels must match. `pack_rows`
alone takes the rows kernels where they run (the same bytes).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
import ml_dtypes

import jep_kernels.quantize
from jep import _checks
# The layout of `quantize_columns` (column_tiles and padded_rows are exported from here).
from jep_kernels.grouped_matmul.dw_fp8 import column_tiles, padded_rows, tile_rows  # noqa: F401
from jep.platform import on_hopper

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448
TILE = 128


def _scales(amax, power_of_two: bool):
    scale = (amax / E4M3_MAX).astype(jnp.float32)
    if power_of_two:  # the power of two at or above: scale = m 2^e, m in [0.5, 1)
        mantissa, exponent = jnp.frexp(scale)
        scale = jnp.where(mantissa == 0.5, scale, jnp.ldexp(jnp.float32(1), exponent))
    return jnp.where(amax == 0, 1.0, scale).astype(jnp.float32)


def _to_e4m3(values):
    """f32 values rounded to e4m3, kept e4m3: XLA's GPU compiler (its default
    `xla_allow_excess_precision`) drops a narrowing conversion that a widening one undoes in the
    same program, so without the barrier `dequantize(*quantize(x))` gives x back unrounded."""
    return lax.optimization_barrier(values.astype(E4M3))


def quantize_rows(x, *, tile: int = TILE, power_of_two_scales: bool = False):
    """Activations: a scale per 1 x `tile` piece of each row.

    Args:
      x: f[..., H], H a multiple of `tile`.
    Returns:
      (q e4m3[..., H], scales f32[..., H / tile]).
    """
    _checks.floating(x, "x")
    width = x.shape[-1]
    if width % tile:
        raise ValueError(f"x's last dimension ({width}) must be a multiple of tile={tile}")
    pieces = x.astype(jnp.float32).reshape(*x.shape[:-1], width // tile, tile)
    scales = _scales(jnp.max(jnp.abs(pieces), axis=-1), power_of_two_scales)
    q = _to_e4m3(pieces / scales[..., None])
    return q.reshape(x.shape), scales


def dequantize_rows(q, scales, dtype=jnp.bfloat16, *, tile: int = TILE):
    """x ~ q * scale for `quantize_rows`' results: [..., H] in `dtype` (rounded once from f32)."""
    width = q.shape[-1]
    if scales.shape != (*q.shape[:-1], width // tile) or width % tile:
        raise ValueError(f"scales must be {(*q.shape[:-1], width // tile)} for q of shape "
                         f"{q.shape} (one per 1 x {tile} tile), got {scales.shape}")
    pieces = q.astype(jnp.float32).reshape(*q.shape[:-1], width // tile, tile)
    return (pieces * scales[..., None]).reshape(q.shape).astype(dtype)


def packed_width(hidden: int, tile: int = TILE) -> int:
    """u32 words of a packed row (`pack_rows`): H e4m3 bytes and H / tile f32 scales."""
    return (hidden + 4 * (hidden // tile)) // 4


def pack(q, scales):
    """Rows q e4m3[T, H] and their scales f32[T, S] as one row of u32 words each,
    [T, (H + 4 S) / 4]: the e4m3 bytes, then the scales' bytes (`pack_rows`)."""
    num_rows = q.shape[0]
    as_bytes = jnp.concatenate([jax.lax.bitcast_convert_type(q, jnp.uint8),
                                jax.lax.bitcast_convert_type(scales, jnp.uint8).reshape(
                                    num_rows, -1)], axis=1)
    return jax.lax.bitcast_convert_type(as_bytes.reshape(num_rows, -1, 4), jnp.uint32)


def pack_rows(x, *, tile: int = TILE):
    """Each row of x [T, H] quantized (`quantize_rows`) and packed with its scales into one row
    of u32 words, [T, packed_width(H)]: the e4m3 bytes, then the scales' bytes (`pack`). What
    FP8 dispatch moves: H + 4 H / 128 bytes a token (0.52 of bf16's 2 H), one row however the
    transport moves rows (an integer type: only copied, never computed on).

    On Hopper, rows the one-pass kernel takes (`jep_kernels.quantize.kernel_takes`, 128-channel
    tiles) are quantized by it, the same bytes in one read of x where XLA's fusions read it
    twice; where H is a multiple of 1024 the kernel stores them straight into the packed rows
    (`jep_kernels.quantize.pack_rows`). On an H200 at 4096 x 7168: 30 us, against 45 for the
    kernel's rows packed by XLA and 80 for XLA's fusions throughout."""
    if tile == TILE and on_hopper():
        if jep_kernels.quantize.pack_kernel_takes(x):
            return jep_kernels.quantize.pack_rows(x)
        if jep_kernels.quantize.kernel_takes(x):
            return pack(*jep_kernels.quantize.quantize_rows(x))
    return pack(*quantize_rows(x, tile=tile))


def unpack_rows(packed, hidden: int, dtype=jnp.bfloat16, *, tile: int = TILE):
    """`pack_rows`' rows back to [T, H] in `dtype`, dequantized (`dequantize_rows`). A row of
    zero words is a zero row."""
    if packed.shape[-1] != packed_width(hidden, tile):
        raise ValueError(f"packed rows of H={hidden} are {packed_width(hidden, tile)} words, got "
                         f"shape {packed.shape}")
    num_rows = packed.shape[0]
    as_bytes = jax.lax.bitcast_convert_type(packed, jnp.uint8).reshape(num_rows, -1)
    q = jax.lax.bitcast_convert_type(as_bytes[:, :hidden], E4M3)
    scales = jax.lax.bitcast_convert_type(
        as_bytes[:, hidden:].reshape(num_rows, hidden // tile, 4), jnp.float32)
    return dequantize_rows(q, scales, dtype, tile=tile)


def _padded_sources(group_sizes, num_rows: int, tile: int):
    """For each row of the padded layout, i32[P]: the row of x it holds, or -1 (padding)."""
    row, held = tile_rows(group_sizes, num_rows, tile)
    offset = jnp.arange(tile, dtype=jnp.int32)
    return jnp.where(offset < held[:, None], row[:, None] + offset, -1).reshape(-1)


def quantize_columns(x, group_sizes, *, tile: int = TILE):
    """A weight gradient's operands (dw[g] = x[rows of g]^T dy[rows of g], the rows the
    contraction): a scale per `tile` x 1 piece of each group's rows (`tile` consecutive rows of
    one group, one channel), transposed, as Hopper's FP8 products read them (K-major).

    Each group's rows start a new tile, so that no tile holds two groups' rows: group g's rows
    are tiles first[g] .. first[g] + tiles[g] of a padded layout of P rows (`column_tiles`,
    `padded_rows`), the rest of its last tile zeros. The tiles after the last group's are
    zeros, with scale 1.

    Args:
      x: f[M, H]; group_sizes: i32[G], the rows of group 0, then 1, ...; rows past their sum
        are left out.
    Returns:
      (q_t e4m3[H, P], scales f32[P / tile, H]): x ~ q_t^T * scale of its tile, P =
      padded_rows(M, G, tile).
    """
    _checks.floating(x, "x")
    _checks.rank(x, 2, "x")
    _checks.rank(group_sizes, 1, "group_sizes")
    source = _padded_sources(group_sizes, x.shape[0], tile)
    padded = jnp.where(source[:, None] >= 0, x[jnp.maximum(source, 0)].astype(jnp.float32), 0)
    pieces = padded.reshape(-1, tile, x.shape[1])
    scales = _scales(jnp.max(jnp.abs(pieces), axis=1), False)
    q = _to_e4m3(pieces / scales[:, None, :]).reshape(padded.shape)
    return q.T, scales


def dequantize_columns(q_t, scales, group_sizes, num_rows: int, dtype=jnp.bfloat16, *,
                       tile: int = TILE):
    """x ~ q * scale for `quantize_columns`' results, back in x's layout: [M, H] in `dtype`,
    rows past the groups zero."""
    width, padded = q_t.shape
    if padded != padded_rows(num_rows, group_sizes.shape[0], tile) or scales.shape != (
            padded // tile, width):
        raise ValueError(f"q_t must be [H, {padded_rows(num_rows, group_sizes.shape[0], tile)}] "
                         f"and scales [P / {tile}, H] for {num_rows} rows in "
                         f"{group_sizes.shape[0]} groups, got {q_t.shape} and {scales.shape}")
    values = (q_t.T.astype(jnp.float32).reshape(-1, tile, width)
              * scales[:, None, :]).reshape(padded, width)
    source = _padded_sources(group_sizes, num_rows, tile)
    # Each row of x from its place in the padded layout (rows past the groups stay zero).
    x = jnp.zeros((num_rows, width), jnp.float32).at[jnp.where(source >= 0, source, num_rows)].set(
        values, mode="drop")
    return x.astype(dtype)


def block_grid(shape, block: int = TILE) -> tuple[int, int]:
    """The scales' shape of a [rows, cols] weight: (ceil(rows / block), ceil(cols / block))."""
    return math.ceil(shape[-2] / block), math.ceil(shape[-1] / block)


def _blocks(w, block: int):
    """w [..., R, C] padded with zeros to whole blocks, as [..., R/b, b, C/b, b]."""
    rows, cols = w.shape[-2:]
    grid = block_grid(w.shape, block)
    pad = [(0, 0)] * (w.ndim - 2) + [(0, grid[0] * block - rows), (0, grid[1] * block - cols)]
    padded = jnp.pad(w, pad)
    return padded.reshape(*w.shape[:-2], grid[0], block, grid[1], block)


def quantize_blocks(w, *, block: int = TILE, power_of_two_scales: bool = False):
    """Weights: a scale per `block` x `block` block of the last two dimensions (the last blocks
    may be partial).

    Args:
      w: f[..., R, C].
    Returns:
      (q e4m3[..., R, C], scales f32[..., ceil(R / block), ceil(C / block)]).
    """
    _checks.floating(w, "w")
    pieces = _blocks(w.astype(jnp.float32), block)
    scales = _scales(jnp.max(jnp.abs(pieces), axis=(-3, -1)), power_of_two_scales)
    return _rounded_blocks(w, scales, block), scales


def _rounded_blocks(w, scales, block: int):
    """w [..., R, C] over its blocks' `scales` [..., R/b, C/b], rounded to e4m3 [..., R, C]. The
    barrier is taken on the [..., R, C] result: taken on the 5-D blocks, it came with a
    transpose fusion of its own in an H200's profile of `quantize_weight`."""
    rows, cols = w.shape[-2:]
    grid = block_grid(w.shape, block)
    pieces = _blocks(w.astype(jnp.float32), block) / scales[..., :, None, :, None]
    return _to_e4m3(pieces.reshape(*w.shape[:-2], grid[0] * block, grid[1] * block)
                    [..., :rows, :cols])


def dequantize_blocks(q, scales, dtype=jnp.bfloat16, *, block: int = TILE):
    """w ~ q * scale of its block for `quantize_blocks`' results (or a checkpoint's weight and
    weight_scale_inv): [..., R, C] in `dtype`, rounded once from f32."""
    grid = block_grid(q.shape, block)
    if scales.shape != (*q.shape[:-2], *grid):
        raise ValueError(f"scales must be {(*q.shape[:-2], *grid)} for q of shape {q.shape} "
                         f"(one per {block} x {block} block), got {scales.shape}")
    rows, cols = q.shape[-2:]
    pieces = _blocks(q.astype(jnp.float32), block) * scales[..., :, None, :, None].astype(
        jnp.float32)
    w = pieces.reshape(*q.shape[:-2], grid[0] * block, grid[1] * block)[..., :rows, :cols]
    return w.astype(dtype)


class QuantizedWeight(NamedTuple):
    """A grouped weight w f[G, K, N] in e4m3 with a scale per 128 x 128 block, in the two
    layouts FP8 products read (`quantize_weight`): Hopper's FP8 tensor-core products take both
    operands K-major, so x @ w[g] reads `q_t` and dy @ w[g]^T reads `q`."""

    q: jax.Array  # e4m3[G, K, N]
    scales: jax.Array  # f32[G, K / 128, N / 128]
    q_t: jax.Array  # e4m3[G, N, K]: q transposed
    scales_t: jax.Array  # f32[G, N / 128, K / 128]


def quantize_weight(w) -> QuantizedWeight:
    """w f[G, K, N] quantized once (`quantize_blocks`), in both layouts (`QuantizedWeight`), bit
    for bit `quantize_blocks(w)` and its transpose.

    q_t is rounded from w read transposed (in w's dtype) with the scales transposed, not
    transposed from q: XLA then writes both layouts in one pass over w after the pass for the
    scales, where a transpose of the e4m3 result is a 1-byte transpose (1.69 against 0.96 ms
    a [32, 7168, 2048] bf16 weight on an H200, the old way against this one)."""
    _checks.floating(w, "w")
    _checks.rank(w, 3, "w")
    q, scales = quantize_blocks(w)
    scales_t = jnp.swapaxes(scales, 1, 2)
    return QuantizedWeight(q, scales, _rounded_blocks(jnp.swapaxes(w, 1, 2), scales_t, TILE),
                           scales_t)
