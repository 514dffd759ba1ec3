"""The weight gradient in FP8 (DeepSeek-V3's recipe), Pallas Mosaic GPU (Hopper).

dw[g] = x[rows of g]^T @ dy[rows of g], the rows the contraction, from both operands quantized
along the rows with a scale per 128 rows of one group x 1 channel and stored transposed
(`jep.fp8.quantize_columns`; `jep_kernels.quantize.quantize_columns` on Hopper): Hopper's FP8
tensor-core products read both operands K-major, and here K is the rows. Each group's rows
start a tile of their own in that layout, so a step (one tile of 128 rows) never holds two
groups' rows: nothing is masked, and every step's scales are the group's own.

Each 128-row step's products go into a float32 accumulator of their own, which is then scaled
by its K rows' x scales times its N columns' dy scales and added to the tile's float32 sum
(the promotion of `grouped_matmul_fp8`, with a scale per column instead of one per block).
Several dy of one x (the gate and up projections') take one kernel: each step of x is loaded
once, and each dy's products go into a sum of their own.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jep_kernels.grouped_matmul.mgpu import (FP8_TILE as TILE, SCOPES, DwConfig, _drain,
                                             _free_stage, _persistent, _store_pieces,
                                             group_rows,
                                             smem_transforms)
from jep_kernels.vma import vary_like

E4M3 = jnp.float8_e4m3fn

# A block_k x block_n tile a program at a time, its rows split between two compute warpgroups
# (64 x 128 each: two float32 accumulators of 64 registers a thread).
DW_FP8_CONFIG = DwConfig(block_k=128, block_n=128, block_rows=TILE, max_concurrent_steps=4,
                         warp_specialized=True, epilogue_k=64, epilogue_n=64)


# The operands' layout (`jep.fp8.quantize_columns` makes it; `jep.fp8` exports these).
def padded_rows(num_rows: int, num_groups: int, tile: int = TILE) -> int:
    """Rows of `jep.fp8.quantize_columns`' layout for M rows in G groups, P: every group starts
    at a multiple of `tile`, so they take at most ceil((M + G (tile - 1)) / tile) tiles."""
    return tile * -(-(num_rows + num_groups * (tile - 1)) // tile)


def column_tiles(group_sizes, num_rows: int, tile: int = TILE):
    """(first, tiles), i32[G] each: group g's rows (clipped to `num_rows`) are `tiles[g]` tiles of
    `jep.fp8.quantize_columns`' layout from tile `first[g]` on."""
    starts, ends = group_rows(group_sizes, num_rows)
    tiles = (ends - starts + tile - 1) // tile
    return jnp.cumsum(tiles) - tiles, tiles


def tile_rows(group_sizes, num_rows: int, tile: int = TILE):
    """(row, held), i32[P / tile] each: the row of x that each tile of `jep.fp8.quantize_columns`'
    layout starts at, and how many of its rows are its group's (the rest padding; none in the
    tiles past the last group's)."""
    starts, ends = group_rows(group_sizes, num_rows)
    first, _ = column_tiles(group_sizes, num_rows, tile)
    index = jnp.arange(padded_rows(num_rows, group_sizes.shape[0], tile) // tile,
                       dtype=jnp.int32)
    # The last group starting at or before each tile (an empty group starts where the next one
    # does, so `right` passes over it). Compared against every group's first tile at once: the
    # default binary search is a while loop, whose kernels a GPU runs outside the step's CUDA
    # graph, each launched on its own (24 a step, 0.24 ms idle, in the FP8 layer at 32 experts).
    group = jnp.maximum(jnp.searchsorted(first, index, side="right", method="compare_all") - 1,
                        0)
    row = starts[group] + (index - first[group]) * tile
    return row, jnp.clip(ends[group] - row, 0, tile)


def check_dw_fp8_shapes(x_t, x_scales, dy_t, dy_scales, group_sizes, num_rows: int, *,
                        config: DwConfig):
    """Raises a ValueError/TypeError naming what `grouped_matmul_dw_fp8` cannot take."""
    if x_t.ndim != 2 or dy_t.ndim != 2 or x_t.shape[1] != dy_t.shape[1]:
        raise ValueError(f"x_t must be [K, P] and dy_t [N, P], got {x_t.shape} and {dy_t.shape}")
    if x_t.dtype != E4M3 or dy_t.dtype != E4M3:
        raise TypeError(f"x_t and dy_t must be float8_e4m3fn, got {x_t.dtype} and {dy_t.dtype}")
    if group_sizes.ndim != 1:
        raise ValueError(f"group_sizes must be [G], got shape {group_sizes.shape}")
    (depth, padded), width = x_t.shape, dy_t.shape[0]
    want = padded_rows(num_rows, group_sizes.shape[0])
    if padded != want:
        raise ValueError(f"x_t and dy_t must have P={want} columns for {num_rows} rows in "
                         f"{group_sizes.shape[0]} groups (jep.fp8.quantize_columns), got {padded}")
    for name, scales, channels in (("x_scales", x_scales, depth), ("dy_scales", dy_scales, width)):
        if scales.shape != (padded // TILE, channels) or scales.dtype != jnp.float32:
            raise ValueError(f"{name} must be float32{[padded // TILE, channels]}, got "
                             f"{scales.dtype}{list(scales.shape)}")
    if not isinstance(config, DwConfig):
        raise TypeError(f"config must be a DwConfig, got {type(config).__name__}")
    if not (config.warp_specialized and config.block_rows == TILE and not config.resident_steps
            and config.block_k % 128 == 0 and config.block_n % 64 == 0
            and (config.block_k // 2) * config.block_n <= 128 * 128
            and config.epilogue_k % 64 == 0):
        raise ValueError(f"the FP8 weight gradient takes warp-specialized configs with "
                         f"block_rows={TILE}, no resident_steps, block_k a multiple of 128 (half "
                         f"a warpgroup), block_n of 64, (block_k / 2) x block_n at most "
                         f"128 x 128 (two float32 accumulators a warpgroup) and epilogue_k a "
                         f"multiple of 64 (the accumulator's register tiles), got {config}")
    if depth % config.block_k or width % config.block_n:
        raise ValueError(f"K={depth} must be a multiple of block_k={config.block_k} and "
                         f"N={width} of block_n={config.block_n}")


def grouped_matmul_dw_fp8(x_t, x_scales, dy_t, dy_scales, group_sizes, *, num_rows: int,
                          config: DwConfig = DW_FP8_CONFIG, out_dtype=jnp.float32,
                          interpret: bool = False):
    """dw[G, K, N]: dw[g] = (x * x_scales)[rows of g]^T @ (dy * dy_scales)[rows of g] from
    `jep.fp8.quantize_columns`' operands, zero for an empty group, rounded once to `out_dtype`.
    With sequences of one length for dy_t and dy_scales (the gate and up products' dy), a tuple
    of the weight gradients of the same x, in one kernel that loads each step of x once for all
    of them (each the same values as a kernel of its own gives).

    Args:
      x_t: e4m3[K, P], x_scales: f32[P / 128, K]: `quantize_columns(x, group_sizes)` of the
        layer's input x [M, K].
      dy_t: e4m3[N, P], dy_scales: f32[P / 128, N]: `quantize_columns(dy, group_sizes)`.
      group_sizes: i32[G]; num_rows: M (the layout's P = `padded_rows(M, G)`).
      config: tiles of block_k x block_n, two compute warpgroups taking block_k / 2 rows each,
        and a third that only issues TMA loads into a ring of `max_concurrent_steps` stages
        that runs on from one tile into the next (`check_dw_fp8_shapes`).
    """
    several = isinstance(dy_t, (list, tuple))
    dys, dy_scales = (list(a) if several else [a] for a in (dy_t, dy_scales))
    if not dys or len(dys) != len(dy_scales) or any(d.shape != dys[0].shape for d in dys):
        raise ValueError(f"dy_t and dy_scales must be as many (at least one), the dy_t of one "
                         f"shape, got {len(dys)} and {len(dy_scales)}: {[d.shape for d in dys]}")
    for dy, scales in zip(dys, dy_scales):
        check_dw_fp8_shapes(x_t, x_scales, dy, scales, group_sizes, num_rows, config=config)
    outs = _dw_fp8(x_t, x_scales, dys, dy_scales, group_sizes, num_rows=num_rows,
                   config=config, out_dtype=out_dtype, interpret=interpret)
    return tuple(outs) if several else outs[0]


def _dw_fp8(x_t, x_scales, dys, dy_scales, group_sizes, *, num_rows, config, out_dtype,
            interpret):
    """`grouped_matmul_dw_fp8` of each of `dys` (checked), one kernel: a list."""
    depth, width = x_t.shape[0], dys[0].shape[0]
    products = len(dys)
    num_groups = group_sizes.shape[0]
    bm, bn, stages = config.block_k, config.block_n, config.max_concurrent_steps
    wm = bm // 2  # each compute warpgroup's rows of a tile
    em, en = min(config.epilogue_k, wm), min(config.epilogue_n, bn)
    k_blocks, n_blocks = depth // bm, width // bn
    num_tiles = num_groups * k_blocks * n_blocks
    out_dtype = jnp.dtype(out_dtype)
    # i32[2 G]: each group's first tile of the layout and its number of tiles.
    table = jnp.stack(column_tiles(group_sizes, num_rows), axis=1).reshape(-1)
    # The interpreter has no transposed shared-memory views: there dy is [P, N] in memory.
    dys_in = [dy.T for dy in dys] if interpret else dys
    dy_tile = (TILE, bn) if interpret else (bn, TILE)
    laid_out = (lambda value, _: value) if interpret else plgpu.layout_cast
    transforms = (lambda minor, dtype: ()) if interpret else smem_transforms

    def body(table_gmem, x_gmem, x_scales_gmem, *refs):
        # Each dy's values and scales, then each weight gradient.
        dy_gmems, dy_scales_gmems = refs[0:2 * products:2], refs[1:2 * products:2]
        out_gmems = refs[2 * products:]
        wg = lax.axis_index("wg")

        def tile_of(info):
            """(group, K block, N block, the group's first tile, its steps): tiles go group by
            group, N block fastest (a group's rows are read by consecutive programs)."""
            index = info.index[0]
            group = index // (k_blocks * n_blocks)
            return (group, index // n_blocks % k_blocks, index % n_blocks,
                    table_gmem[2 * group], table_gmem[2 * group + 1])

        @functools.partial(
            pl.run_scoped,
            x_smem=plgpu.SMEM((stages, bm, TILE), E4M3, transforms=transforms(TILE, E4M3)),
            dy_smem=[plgpu.SMEM((stages, *dy_tile), E4M3, transforms=transforms(dy_tile[1], E4M3))
                     for _ in range(products)],
            x_scale_smem=plgpu.SMEM((stages, 1, bm), jnp.float32),
            dy_scale_smem=[plgpu.SMEM((stages, 1, bn), jnp.float32) for _ in range(products)],
            out_smem=plgpu.SMEM((2, 2, em, en), out_dtype, transforms=transforms(en, out_dtype)),
            loaded=plgpu.Barrier(num_arrivals=2 + 2 * products, num_barriers=stages),
            consumed=plgpu.Barrier(num_arrivals=2, num_barriers=stages),
            collective_axes="wg",
        )
        def _scope(x_smem, dy_smem, x_scale_smem, dy_scale_smem, out_smem, loaded, consumed):
            @pl.when(wg == 2)
            def _memory():
                plgpu.set_max_registers(40, action="decrease")

                def tile_loads(info, carry):
                    count = carry  # the steps loaded before this tile's
                    _, kb, nb, first, steps = tile_of(info)
                    ks = pl.ds(pl.multiple_of(kb * bm, bm), bm)
                    ns = pl.ds(pl.multiple_of(nb * bn, bn), bn)

                    @pl.loop(0, steps)
                    def _(b):
                        slot = _free_stage(consumed, count + b, stages)
                        tile = first + b
                        rows = pl.ds(pl.multiple_of(tile * TILE, TILE), TILE)
                        plgpu.copy_gmem_to_smem(x_gmem.at[ks, rows], x_smem.at[slot],
                                                loaded.at[slot])
                        plgpu.copy_gmem_to_smem(x_scales_gmem.at[pl.ds(tile, 1), ks],
                                                x_scale_smem.at[slot], loaded.at[slot])
                        for p in range(products):
                            plgpu.copy_gmem_to_smem(
                                dy_gmems[p].at[rows, ns] if interpret else
                                dy_gmems[p].at[ns, rows], dy_smem[p].at[slot], loaded.at[slot])
                            plgpu.copy_gmem_to_smem(dy_scales_gmems[p].at[pl.ds(tile, 1), ns],
                                                    dy_scale_smem[p].at[slot], loaded.at[slot])

                    return count + steps

                total = plgpu.nd_loop((num_tiles,), collective_axes="sm",
                                      init_carry=jnp.int32(0))(tile_loads)
                _drain(consumed, total, stages)

            @pl.when(wg < 2)
            def _compute():
                plgpu.set_max_registers(232, action="increase")

                def tile_product(info, carry):
                    count = carry  # the steps taken before this tile's
                    group, kb, nb, _, steps = tile_of(info)

                    def promoted(slot, p, acc):
                        """acc + this step's products with dy p, scaled (one accumulator of
                        their own, then the promotion)."""
                        x_part = x_smem.at[slot, pl.ds(wg * wm, wm)]
                        dy_part = (dy_smem[p].at[slot] if interpret else
                                   plgpu.transpose_ref(dy_smem[p].at[slot], (1, 0)))

                        def block(part_ref):
                            plgpu.wgmma(part_ref, x_part, dy_part)
                            return part_ref[...]

                        part = pl.run_scoped(block, plgpu.ACC((wm, bn)))
                        row_scales = laid_out(x_scale_smem.at[slot, 0, pl.ds(wg * wm, wm)][...],
                                              plgpu.Layout.WGMMA.reduce(1))
                        col_scales = laid_out(dy_scale_smem[p].at[slot, 0][...],
                                              plgpu.Layout.WGMMA.reduce(0))
                        return acc + (part * lax.broadcast_in_dim(row_scales, (wm, bn), [0])
                                      * lax.broadcast_in_dim(col_scales, (wm, bn), [1]))

                    def step(b, accs):
                        slot = (count + b) % stages
                        plgpu.barrier_wait(loaded.at[slot])
                        accs = tuple(promoted(slot, p, acc) for p, acc in enumerate(accs))
                        plgpu.barrier_arrive(consumed.at[slot])
                        return accs

                    # Zero for an empty group (no steps).
                    zero = laid_out(jnp.zeros((wm, bn), jnp.float32), plgpu.Layout.WGMMA)
                    accs = lax.fori_loop(0, steps, step, (zero,) * products)
                    for acc, out_gmem in zip(accs, out_gmems):
                        def destination(i, j, out_gmem=out_gmem):
                            return out_gmem.at[
                                group, pl.ds(pl.multiple_of(kb * bm + wg * wm + i * em, 8), em),
                                pl.ds(pl.multiple_of(nb * bn + j * en, en), en)]

                        _store_pieces(acc.astype(out_dtype), out_smem.at[wg], destination,
                                      (em, en))
                    return count + steps

                plgpu.nd_loop((num_tiles,), collective_axes="sm",
                              init_carry=jnp.int32(0))(tile_product)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    out_type = jax.ShapeDtypeStruct((num_groups, depth, width), out_dtype)
    outs = _persistent(body, (out_type,) * products, interpret, name=SCOPES["dw_fp8"],
                       warpgroups=3)(table, x_t, x_scales,
                                     *(a for pair in zip(dys_in, dy_scales) for a in pair))
    return [vary_like(out, x_t) for out in outs]
