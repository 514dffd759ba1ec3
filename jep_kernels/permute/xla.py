"""The row gathers as XLA runs them fastest: rows of 2-byte elements moved as 32-bit words.

XLA's GPU gather of bf16 rows moves one 2-byte element a thread; the same rows seen as uint32
words (two elements a word) move half as many, wider. On an H200 at Qwen3-30B-A3B's sizes
(4096 tokens x 8 rows of 2048 bf16, 134 MB written) that took the dispatch's expansion from 88
to 52 us, and the scaled gather of combine's backward from 91 to 58 (BENCHMARKS.md).

- `gather`: out[i] = rows[index[i]], a zero row where index[i] is outside [0, N).
- `gather_scaled`: out[i] = rows[index[i]] * scale[i], the product in float32, rounded once
  to rows.dtype: a 2-byte row's words are split into their two halves as float32, scaled,
  and rounded back to nearest even in the words (bit for bit what `astype` does).
- `gather_dots`: dots[i, j] = <rows[index[i, j]], other[i]> in float32.

Each returns what `reference` returns (the dots up to the order of the float32 sum). Rows of
other dtypes (float32, an odd H, float64) take the reference's gathers.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jep_kernels.permute import reference

__all__ = ["gather", "gather_dots", "gather_scaled"]


def _as_words(rows):
    """Whether `rows` [N, H] move as uint32 words: 2-byte floats, H even."""
    return (rows.ndim == 2 and jnp.dtype(rows.dtype).itemsize == 2
            and jnp.issubdtype(rows.dtype, jnp.floating) and rows.shape[1] % 2 == 0)


def _words(rows):
    """[N, H] 2-byte rows -> u32[N, H / 2], element 2c in the low half of word c."""
    return lax.bitcast_convert_type(rows.reshape(rows.shape[0], -1, 2), jnp.uint32)


def _rows(words, dtype):
    """The inverse of `_words`."""
    return lax.bitcast_convert_type(words, dtype).reshape(words.shape[0], -1)


def _halves(words, dtype):
    """f32 (low, high): the two elements of each word, exactly (bf16 and f16 fit float32)."""
    if dtype == jnp.bfloat16:  # a bf16 is the top half of its float32
        return (lax.bitcast_convert_type(words << 16, jnp.float32),
                lax.bitcast_convert_type(words & jnp.uint32(0xFFFF0000), jnp.float32))
    low = lax.bitcast_convert_type((words & jnp.uint32(0xFFFF)).astype(jnp.uint16), dtype)
    high = lax.bitcast_convert_type((words >> 16).astype(jnp.uint16), dtype)
    return low.astype(jnp.float32), high.astype(jnp.float32)


def _bits(values, dtype):
    """u32 holding `values` (f32) rounded to `dtype` in the low 16 bits."""
    if dtype == jnp.bfloat16:  # round to nearest even on the top half; a NaN stays a NaN
        bits = lax.bitcast_convert_type(values, jnp.uint32)
        rounded = (bits + jnp.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16
        return jnp.where(jnp.isnan(values), jnp.uint32(0x7FC0), rounded)
    return lax.bitcast_convert_type(values.astype(dtype), jnp.uint16).astype(jnp.uint32)


def _gather_words(rows, index):
    """u32[M, H / 2]: the words of rows[index], zero where index is outside [0, N)."""
    num_rows = rows.shape[0]
    valid = (index >= 0) & (index < num_rows)
    words = _words(rows).at[jnp.clip(index, 0, num_rows - 1)].get(mode="promise_in_bounds")
    return jnp.where(valid[:, None], words, jnp.uint32(0))


def gather(rows, index):
    """[M, H] in rows.dtype: rows[index[i]], a zero row where index[i] is outside [0, N).

    Args:
      rows: [N, H].
      index: i[M].
    """
    if not _as_words(rows) or rows.shape[0] == 0:
        return reference.gather(rows, index)
    return _rows(_gather_words(rows, index), rows.dtype)


def gather_scaled(rows, index, scale):
    """[M, H] in rows.dtype: rows[index[i]] * scale[i], multiplied in float32 and rounded once;
    a zero row where index[i] is outside [0, N).

    Args:
      rows: [N, H], floating.
      index: i[M].
      scale: f[M].
    """
    valid = (index >= 0) & (index < rows.shape[0])
    scale = jnp.where(valid, scale.astype(jnp.float32), 0.0)[:, None]  # zero rows stay zero
    if not _as_words(rows) or rows.shape[0] == 0:
        return (reference.gather(rows, index).astype(jnp.float32) * scale).astype(rows.dtype)
    low, high = _halves(_gather_words(rows, index), rows.dtype)
    return _rows(_bits(low * scale, rows.dtype) | (_bits(high * scale, rows.dtype) << 16),
                 rows.dtype)


def gather_dots(rows, index, other):
    """f32[M, k]: the float32 dot product of rows[index[i, j]] with other[i]; 0 where
    index[i, j] is outside [0, N).

    Args:
      rows: [N, H].
      index: i[M, k].
      other: [M, H], rows.dtype.
    """
    if not (_as_words(rows) and rows.dtype == other.dtype) or rows.shape[0] == 0:
        other = other.astype(jnp.float32)
        return jnp.stack([jnp.sum(reference.gather(rows, index[:, j]).astype(jnp.float32)
                                  * other, axis=-1) for j in range(index.shape[1])], axis=1)
    other_low, other_high = _halves(_words(other), other.dtype)
    dots = []
    for j in range(index.shape[1]):
        low, high = _halves(_gather_words(rows, index[:, j]), rows.dtype)
        dots.append(jnp.sum(low * other_low + high * other_high, axis=-1))
    return jnp.stack(dots, axis=1)
