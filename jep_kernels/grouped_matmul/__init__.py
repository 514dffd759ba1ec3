"""Grouped GEMM kernels: y[rows of group g] = x[rows of g] @ w[g], groups contiguous.

`grouped_matmul` is differentiable (`jax.custom_vjp`), all three products Pallas Mosaic GPU kernels
of `mgpu`: the forward, dx (the same kernel reading w transposed) and dw[g] = x[rows of g]^T @
dy[rows of g] (`mgpu.grouped_matmul_dw`, the group's rows as the contraction).

Each product runs with its own `Config`, looked up by shape in the tuning table (`tuning`)
unless one is given. Runs on Hopper GPUs (`interpret=True`: Pallas's GPU interpret mode, on the
CPU, for tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jep_kernels.grouped_matmul import mgpu, tuning
from jep_kernels.grouped_matmul.mgpu import SCOPES, Config, check_shapes
from jep_kernels.vma import vary_like

__all__ = ["Config", "SCOPES", "SHAPE_MULTIPLE", "check_shapes", "configs_for", "grouped_matmul"]


ROW_TILE = 8  # TMA wants the row count of an array a multiple of this
SHAPE_MULTIPLE = 128  # the default configurations take every K and N that are multiples of this


def _pad_rows(a):
    extra = -a.shape[0] % ROW_TILE
    return jnp.pad(a, ((0, extra), (0, 0))) if extra else a


def _product(x, w, group_sizes, *, transpose_w, config, interpret):
    with jax.named_scope(SCOPES["dx" if transpose_w else "forward"]):
        if transpose_w and interpret:
            # The interpreter has no transposed shared-memory views: transpose in memory instead.
            w, transpose_w = jnp.swapaxes(w, 1, 2), False
        y = mgpu.grouped_matmul(_pad_rows(x), w, group_sizes, transpose_w=transpose_w,
                                config=config, interpret=interpret)
        return vary_like(y[:x.shape[0]], x, w, group_sizes)


def _weight_gradient(x, dy, group_sizes, *, config, out_dtype, interpret):
    with jax.named_scope(SCOPES["dw"]):
        dw = mgpu.grouped_matmul_dw(_pad_rows(x), _pad_rows(dy), group_sizes, config=config,
                                    out_dtype=out_dtype, interpret=interpret)
        return vary_like(dw, x, dy, group_sizes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _grouped_matmul(x, w, group_sizes, configs, interpret):
    return _product(x, w, group_sizes, transpose_w=False, config=configs["forward"],
                    interpret=interpret)


def _fwd(x, w, group_sizes, configs, interpret):
    y = _product(x, w, group_sizes, transpose_w=False, config=configs["forward"],
                 interpret=interpret)
    return y, (x, w, group_sizes)


def _bwd(configs, interpret, residuals, dy):
    x, w, group_sizes = residuals
    dy = dy.astype(x.dtype)
    dx = _product(dy, w, group_sizes, transpose_w=True, config=configs["dx"],
                  interpret=interpret)
    dw = _weight_gradient(x, dy, group_sizes, config=configs["dw"], out_dtype=w.dtype,
                          interpret=interpret)
    return dx, vary_like(dw, w), None


_grouped_matmul.defvjp(_fwd, _bwd)


class _Configs(dict):
    """The configurations of the three products, hashable (a custom_vjp static argument)."""

    def __hash__(self):
        return hash(tuple(sorted(self.items())))


def configs_for(w_shape, config: Config | None = None) -> dict[str, Config]:
    """{"forward", "dx", "dw"} -> Config for a w of `w_shape` ([G, K, N]): `config` for all three
    when given, else each product's entry of the tuning table."""
    groups, k, n = w_shape
    return _Configs({op: config or tuning.config_for(op, *tuning.product_shape(op, k, n), groups)
                     for op in tuning.OPS})


def grouped_matmul(x, w, group_sizes, *, config: Config | None = None, interpret: bool = False):
    """y[M, N] = x[rows of g] @ w[g] for each group g; rows past sum(group_sizes) are zero.

    Args:
      x: bf16/f16 [M, K]; w: [G, K, N] of the same dtype; group_sizes: i32[G].
      config: tile sizes (`Config`) for all three products (forward, dx, dw); by default each
        product's own from the tuning table. K and N must be multiples of the tiles.
      interpret: run in Pallas's GPU interpret mode (CPU, slow; for tests).
    """
    if w.ndim != 3:
        raise ValueError(f"w must be [G, K, N], got {w.shape}")
    configs = configs_for(w.shape, config)
    check_shapes(x, w, group_sizes, transpose_w=False, config=configs["forward"])
    k, n = w.shape[1:]
    dx, dw = configs["dx"], configs["dw"]
    dx_tile_n = dx.block_n * (2 if dx.warp_specialized else 1)
    if n % dx.block_k or k % dx_tile_n:
        raise ValueError(f"N={n} must be a multiple of block_k={dx.block_k} and K={k} of the tile "
                         f"width {dx_tile_n} (the tiles of dx = dy @ w^T)")
    if k % dw.block_m or n % mgpu.dw_tile_n(dw):
        raise ValueError(f"K={k} must be a multiple of block_m={dw.block_m} and N={n} of the "
                         f"tile width {mgpu.dw_tile_n(dw)} (the tiles of the weight gradient)")
    # Inside shard_map: give the three the same mesh-axis type, so that each result and cotangent
    # has one type; where w is replicated over an axis x varies over, the cast's transpose sums
    # dw over that axis.
    group_sizes = group_sizes.astype(jnp.int32)
    x, w, group_sizes = (vary_like(a, x, w, group_sizes) for a in (x, w, group_sizes))
    return _grouped_matmul(x, w, group_sizes, configs, interpret)
