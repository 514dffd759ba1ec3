"""The grouped GEMM in Pallas Mosaic GPU (Hopper): y[rows of g] = x[rows of g] @ w[g].

A persistent kernel: one program per multiprocessor walks a list of output tiles. A tile is a
work item of `schedule.work_items` (a group and a block of `block_m` rows from the group's first
row, rounded down to a multiple of 8) times a block of `block_n` columns. For each tile the K
dimension is streamed through shared memory by TMA in a pipeline of `max_concurrent_steps`
stages and multiplied on the tensor cores (wgmma) into a float32 accumulator; the tile's rows of
its group are then stored through shared memory with TMA (rows of a block that belong to the
neighbouring groups are computed and not stored). Rows past the last group are stored as zeros.

bf16 or f16 in, f32 accumulation, the output in the input dtype. `grouped_matmul_fp8` is the
warp-specialized kernel with e4m3 operands and DeepSeek-V3's scales, each 128-deep step scaled
into the float32 accumulator.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jep_kernels.grouped_matmul import schedule


@dataclasses.dataclass(frozen=True)
class Config:
    """Tile sizes and pipeline depth of one kernel launch."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    max_concurrent_steps: int = 4
    # The forward/dx kernel: two compute warpgroups, each with its own block_n columns of a
    # block_m x (2 block_n) tile, fed by a third that only issues TMA loads; stores in
    # epilogue tiles of epilogue_m x epilogue_n, overlapped with the next tile's loads.
    warp_specialized: bool = False
    epilogue_m: int = 64
    epilogue_n: int = 64
    # Warp-specialized only: 2 runs pairs of blocks (a cluster) on neighbouring column tiles
    # of the same rows, each loading half of the x tile and multicasting it to both.
    cluster_n: int = 1
    # Warp-specialized only: how the two compute warpgroups share the block_m x (2 block_n)
    # tile. "n": each takes block_n columns of all rows; "m": each takes block_m / 2 rows of all
    # 2 block_n columns (one wgmma of width 2 block_n reads its x rows from shared memory once).
    split: str = "n"
    # Warp-specialized only: the order of the tiles. Work items are taken `band` at a time; the
    # tiles of a band go column by column, each column's `band` items in a row. 1: each item's
    # columns in turn.
    band: int = 1
    # Warp-specialized only: epilogue tiles whose rows all belong to the item go out through a
    # swizzled shared-memory tile (bank-conflict-free stores from registers); the others through
    # a plain one, row by row as their group allows.
    swizzled_epilogue: bool = False
    # Warp-specialized only: the rows of one accumulator. 0: a compute warpgroup's rows of the
    # tile in one. 64: in accumulators of 64 rows, and one that holds none of the item's rows
    # gets no products, so that the last block of a group a few rows past a multiple of
    # block_m computes about its rows only (with block_m 256, most groups of up to about 250
    # rows take one block: one read of their weights). Split by rows, two accumulators a
    # warpgroup: an item within the block's first half is shared out at a quarter of the
    # block a warpgroup, so that both multiply. FP8: a float32 sum of 64 rows each, every
    # step's products of each through one 64-row part in turn (block_m 256 split by rows:
    # two sums and a part, 192 registers, where one part of 128 rows would spill).
    acc_rows: int = 0
    # Warp-specialized only: one pipeline across all of a program's tiles. The memory
    # warpgroup loads the next tiles' first steps while the compute warpgroups finish a tile
    # and store it, so a tile of few steps (K = 2048 is 32 steps of 64) does not begin with an
    # empty pipeline. False: each tile starts a pipeline of its own. Not with cluster_n = 2.
    across_tiles: bool = False

    def __post_init__(self):
        _positive(self, "block_m", "block_n", "block_k", "max_concurrent_steps", "epilogue_m",
                  "epilogue_n", "band")
        if self.acc_rows not in (0, 64):
            raise ValueError(f"Config.acc_rows must be 0 or 64, got {self.acc_rows!r}")
        if self.cluster_n not in (1, 2):
            raise ValueError(f"Config.cluster_n must be 1 or 2, got {self.cluster_n!r}")
        if self.split not in ("m", "n"):
            raise ValueError(f"Config.split must be 'm' or 'n', got {self.split!r}")
        if self.across_tiles not in (False, True):
            raise ValueError(f"Config.across_tiles must be a bool, got {self.across_tiles!r}")
        if self.across_tiles and (not self.warp_specialized or self.cluster_n != 1):
            raise ValueError("Config.across_tiles needs warp_specialized=True and cluster_n=1, "
                             f"got warp_specialized={self.warp_specialized}, "
                             f"cluster_n={self.cluster_n}")


@dataclasses.dataclass(frozen=True)
class DwConfig:
    """Tiles and pipeline depth of the weight-gradient kernel, dw[g] = x[rows of g]^T @
    dy[rows of g]: [K, N] per group, the group's rows the contraction."""

    block_k: int = 128  # rows of an output tile: a block of K (x's columns)
    block_n: int = 128  # columns of an output tile; warp-specialized, each compute warpgroup's
    block_rows: int = 64  # rows of x and dy contracted per pipeline step
    max_concurrent_steps: int = 4
    # Warp-specialized: two compute warpgroups, each with its own block_n columns of a
    # block_k x (2 block_n) tile, fed by a third that only issues TMA loads, one pipeline over
    # all of a program's tiles; stores in epilogue pieces of epilogue_k x epilogue_n.
    warp_specialized: bool = False
    epilogue_k: int = 64
    epilogue_n: int = 64
    # Warp-specialized only: a group's dy rows of up to `resident_steps` steps are loaded once
    # for a run of `run_k_blocks` tiles along K (0: all of K) and stay in shared memory while
    # x's rows stream past them; a group with more steps loads its dy rows for every tile.
    # 0: dy's rows are loaded for every tile, in step with x's.
    resident_steps: int = 0
    run_k_blocks: int = 0

    def __post_init__(self):
        _positive(self, "block_k", "block_n", "block_rows", "max_concurrent_steps", "epilogue_k",
                  "epilogue_n")
        for name in ("resident_steps", "run_k_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"DwConfig.{name} must be an int >= 0, got {value!r}")
        if self.resident_steps and not self.warp_specialized:
            raise ValueError("DwConfig: resident_steps needs warp_specialized=True")
        if self.resident_steps == 1:
            raise ValueError("DwConfig: resident_steps must be 0 or at least 2, got 1")
        if self.warp_specialized:
            if self.block_rows % 64 or self.block_n % 64:
                raise ValueError(f"DwConfig: block_rows={self.block_rows} and block_n="
                                 f"{self.block_n} must be multiples of 64 warp-specialized")
            if self.max_concurrent_steps < 2:
                raise ValueError("DwConfig: warp-specialized needs max_concurrent_steps >= 2, "
                                 f"got {self.max_concurrent_steps}")


def _positive(config, *names) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{type(config).__name__}.{name} must be an int >= 1, got {value!r}")


def interpret_params():
    """Parameters that run a Mosaic GPU kernel in Pallas's GPU interpret mode (on the CPU).

    Reads past the end of an array return zeros, as TMA loads do on the GPU (the last row block
    may reach past M)."""
    params = getattr(plgpu, "InterpretParams", None)
    if params is None:  # jax 0.10: not yet exported
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params
    return params(out_of_bounds_reads="uninitialized", uninitialized_memory="zero")


# Each product runs under a name scope of its own, and its kernel has the same name: a profile
# of a step tells the three apart by these names (`jep.bench.profile.KINDS`).
SCOPES = {"forward": "jep_grouped_forward", "dx": "jep_grouped_dx", "dw": "jep_grouped_dw",
          "fp8": "jep_grouped_fp8", "dw_fp8": "jep_grouped_dw_fp8"}


def named(body, name: str):
    """`body`, renamed: Mosaic GPU names a kernel after its body function
    ("<name>_mosaic_gpu_kernel" in a profile), and jep names each after the name scope its
    product runs under (`SCOPES`), so that a profile tells the kernels apart."""
    body.__name__ = body.__qualname__ = name
    return body


def _persistent(body, out_type, interpret: bool, *, name: str, cluster: int = 1,
                warpgroups: int = 1):
    """A kernel named `name` of one program per multiprocessor (axis "sm"; 2 programs when
    interpreted), programs grouped in clusters of `cluster` (axis "cluster"), each with
    `warpgroups` threads (axis "wg") when more than one."""
    programs = 2 if interpret else getattr(jax.devices()[0], "core_count", None) or 132
    threads = dict(num_threads=warpgroups, thread_name="wg") if warpgroups > 1 else {}
    clusters = dict(cluster=(cluster,), cluster_names=("cluster",)) if cluster > 1 else {}
    return plgpu.kernel(
        named(body, name),
        out_type=out_type,
        grid=(programs // cluster,),
        grid_names=("sm",),
        **clusters,
        **threads,
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret_params() if interpret else None,
    )


def check_shapes(x, w, group_sizes, *, transpose_w: bool, config: Config):
    """Raises a ValueError/TypeError naming what this kernel cannot take."""
    if x.ndim != 2 or w.ndim != 3:
        raise ValueError(f"x must be [M, K] and w [G, K, N], got {x.shape} and {w.shape}")
    if x.dtype != w.dtype or x.dtype not in (jnp.bfloat16, jnp.float16):
        raise TypeError(f"x and w must both be bf16 or both f16, got {x.dtype} and {w.dtype}")
    k_w, n = (w.shape[2], w.shape[1]) if transpose_w else (w.shape[1], w.shape[2])
    if x.shape[1] != k_w:
        raise ValueError(f"x's K ({x.shape[1]}) must match w's ({k_w})")
    if group_sizes.shape != (w.shape[0],):
        raise ValueError(f"group_sizes must be [{w.shape[0]}], got {group_sizes.shape}")
    tile_n = config.block_n * (2 if config.warp_specialized else 1)
    if config.warp_specialized:
        tile_n *= config.cluster_n
        for name in ("block_n", "epilogue_m", "epilogue_n"):
            if getattr(config, name) % 64:
                raise ValueError(f"{name}={getattr(config, name)} must be a multiple of 64 for "
                                 "the warp-specialized kernel (its register and swizzle tiles)")
        if config.split == "m" and (config.block_m % 128
                                    or (config.block_m // 2) % min(config.epilogue_m, config.block_m)):
            raise ValueError(f"split='m' needs block_m a multiple of 128 (64 rows a warpgroup) "
                             f"and block_m / 2 a multiple of epilogue_m, got block_m="
                             f"{config.block_m}, epilogue_m={config.epilogue_m}")
    if config.acc_rows:
        wm = config.block_m // 2 if config.split == "m" else config.block_m
        if not config.warp_specialized or wm % config.acc_rows or config.acc_rows % min(
                config.epilogue_m, wm):
            raise ValueError(f"acc_rows={config.acc_rows} needs the warp-specialized kernel, "
                             f"its warpgroup's rows ({wm}) a multiple of it and it a multiple "
                             f"of epilogue_m={config.epilogue_m}")
    if k_w % config.block_k or n % tile_n:
        raise ValueError(
            f"K={k_w} must be a multiple of block_k={config.block_k} and N={n} of the tile "
            f"width {tile_n}")


def _pad_for_blocks(x, block_m: int, interpret: bool):
    """x, with block_m zero rows more when interpreted. A block starts at its group's first row
    and may reach past M: TMA loads read zeros there, the interpreter's views do not."""
    return jnp.pad(x, ((0, block_m), (0, 0))) if interpret else x


def grouped_matmul(x, w, group_sizes, *, transpose_w: bool = False, config: Config = Config(),
                   interpret: bool = False):
    """y[M, N]: rows of group g times w[g] ([K, N], or [N, K] transposed when `transpose_w`).

    Groups are contiguous row ranges given by `group_sizes` (i32[G]); rows past their sum are
    zero. M need not be a multiple of anything; K must be a multiple of block_k, N of block_n.
    """
    check_shapes(x, w, group_sizes, transpose_w=transpose_w, config=config)
    if config.warp_specialized:
        return _grouped_matmul_ws([x], [w], group_sizes, transpose_w=transpose_w,
                                  config=config, interpret=interpret)
    num_rows, depth = x.shape
    num_groups = w.shape[0]
    width = w.shape[1] if transpose_w else w.shape[2]
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    items = schedule.work_items(group_sizes, num_rows, bm).reshape(-1)
    num_items = items.shape[0] // 4
    col_blocks = width // bn
    x = _pad_for_blocks(x, bm, interpret)

    def body(items_gmem, x_gmem, w_gmem, out_gmem):
        @plgpu.nd_loop((num_items * col_blocks,), collective_axes="sm")
        def _tile(info):
            tile = info.index[0]
            item, col = tile // col_blocks, tile % col_blocks
            group = items_gmem[4 * item]
            row = pl.multiple_of(items_gmem[4 * item + 1], schedule.ROW_ALIGN)
            first_row = items_gmem[4 * item + 2]
            end_row = items_gmem[4 * item + 3]
            computes = group < num_groups

            @pl.when(group >= 0)
            def _item():
                def multiply(acc_ref):
                    @pl.when(computes)
                    def _():
                        w_spec = (plgpu.BlockSpec((bn, bk), lambda kk: (col, kk), delay_release=1)
                                  if transpose_w else
                                  plgpu.BlockSpec((bk, bn), lambda kk: (kk, col), delay_release=1))
                        plgpu.emit_pipeline(
                            lambda _, x_smem, w_smem: plgpu.wgmma(
                                acc_ref, x_smem,
                                plgpu.transpose_ref(w_smem, (1, 0)) if transpose_w else w_smem),
                            grid=(depth // bk,),
                            in_specs=[plgpu.BlockSpec((bm, bk), lambda kk: (0, kk),
                                                      delay_release=1), w_spec],
                            max_concurrent_steps=config.max_concurrent_steps,
                        )(x_gmem.at[pl.ds(row, bm)], w_gmem.at[jnp.minimum(group, num_groups - 1)])
                    return acc_ref[...]

                acc = pl.run_scoped(multiply, plgpu.ACC((bm, bn)))

                @functools.partial(pl.run_scoped, out_smem=plgpu.SMEM((bm, bn), out_gmem.dtype))
                def _store(out_smem):
                    @pl.when(computes)
                    def _():
                        out_smem[...] = acc.astype(out_smem.dtype)

                    @pl.when(~computes)
                    def _():
                        out_smem[...] = jnp.zeros((bm, bn), out_smem.dtype)

                    plgpu.commit_smem()
                    _store_rows(out_smem, out_gmem, row, first_row - row, end_row - first_row,
                                col * bn, min(bm, num_rows), bn)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    return _persistent(body, jax.ShapeDtypeStruct((num_rows, width), x.dtype), interpret,
                       name=SCOPES["dx" if transpose_w else "forward"])(items, x, w)


def grouped_matmul_sum(xs, ws, group_sizes, *, transpose_w: bool = False, config: Config,
                       interpret: bool = False):
    """y[M, N] = sum over i of xs[i][rows of g] @ ws[i][g]: several grouped products of the
    same rows and groups into one float32 accumulator, rounded once (the gate and up
    products' dx of a SwiGLU expert, dg @ w_gate[g]^T + du @ w_up[g]^T, in one kernel that
    writes dx once instead of two partial dx and their sum).

    Args:
      xs: P arrays bf16/f16 [M, K_i] (the same M and dtype); ws: P arrays [G, K_i, N] (or
        [G, N, K_i] when `transpose_w`), the same N; each K_i a multiple of block_k.
      group_sizes: i32[G]. config: warp-specialized with `across_tiles` where P > 1 (the
        kernel whose memory warpgroup loads each step from its own pair), cluster_n 1.
    """
    xs, ws = list(xs), list(ws)
    if not xs or len(xs) != len(ws):
        raise ValueError(f"xs and ws must be as many (at least one), got {len(xs)} and {len(ws)}")
    if len(xs) == 1:  # checks its shapes
        return grouped_matmul(xs[0], ws[0], group_sizes, transpose_w=transpose_w,
                              config=config, interpret=interpret)
    for x, w in zip(xs, ws):
        check_shapes(x, w, group_sizes, transpose_w=transpose_w, config=config)
        if x.shape[0] != xs[0].shape[0] or x.dtype != xs[0].dtype or w.shape[0] != ws[0].shape[0]:
            raise ValueError(f"xs must have the same rows and dtype and ws the same groups, got "
                             f"{[(x.shape, str(x.dtype)) for x in xs]} and "
                             f"{[w.shape for w in ws]}")
        if (w.shape[1] if transpose_w else w.shape[2]) != (
                ws[0].shape[1] if transpose_w else ws[0].shape[2]):
            raise ValueError(f"ws must have the same N, got {[w.shape for w in ws]}")
    if not (config.warp_specialized and config.across_tiles):
        raise ValueError(f"a sum of {len(xs)} products needs a warp-specialized config with "
                         f"across_tiles=True (one ring of stages, loaded from each pair in "
                         f"turn), got {config}")
    return _grouped_matmul_ws(xs, ws, group_sizes, transpose_w=transpose_w, config=config,
                              interpret=interpret)


# The activations the gated kernel applies in its epilogue, on float32 values, written with the
# operations Mosaic GPU lowers (jax.nn.gelu's default is its tanh approximation).
GATED_ACTIVATIONS = {
    "silu": lambda v: v / (1.0 + jnp.exp(-v)),
    "gelu": lambda v: 0.5 * v * (1.0 + jnp.tanh(0.7978845608028654 * (v + 0.044715 * v * v * v))),
    "relu": lambda v: jnp.maximum(v, 0.0),
}


def grouped_matmul_gated(x, w_gate, w_up, group_sizes, *, activation: str = "silu",
                         config: Config, interpret: bool = False):
    """(h, gate, up), each [M, N] in x's dtype: gate = x[rows of g] @ w_gate[g], up = x[rows of
    g] @ w_up[g] and h = act(gate) * up, in one kernel: each step of x is loaded once for both
    products, and h is computed in the epilogue from the two float32 accumulators (a SwiGLU
    expert's first half; gate and up are what its backward needs). Rows past the groups are
    zero.

    Args:
      x: bf16/f16 [M, K]; w_gate, w_up: [G, K, N], x's dtype; group_sizes: i32[G].
      activation: "silu", "gelu" (its tanh approximation, jax.nn.gelu's default) or "relu".
      config: warp-specialized with `across_tiles` (the ring's stages hold a step of x and of
        both weights), cluster_n 1.
    """
    if activation not in GATED_ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(GATED_ACTIVATIONS)}, got "
                         f"{activation!r}")
    check_shapes(x, w_gate, group_sizes, transpose_w=False, config=config)
    if w_up.shape != w_gate.shape or w_up.dtype != w_gate.dtype:
        raise ValueError(f"w_up must be w_gate's shape and dtype, got {w_up.dtype}{w_up.shape} "
                         f"and {w_gate.dtype}{w_gate.shape}")
    if not (config.warp_specialized and config.across_tiles):
        raise ValueError(f"the gated kernel needs a warp-specialized config with "
                         f"across_tiles=True (one ring of stages), got {config}")
    return _grouped_matmul_ws([x], [w_gate, w_up], group_sizes, transpose_w=False,
                              config=config, interpret=interpret, gated=activation)


def _grouped_matmul_ws(xs, ws, group_sizes, *, transpose_w, config, interpret, scales=None,
                       out_dtype=None, name=None, gated=None):
    """`grouped_matmul` with warp specialization: see `Config.warp_specialized`; the sum of
    the products xs[i] @ ws[i] (`grouped_matmul_sum`), each pair's steps in turn into one
    accumulator (more than one pair only with `Config.across_tiles`).

    With `scales` = (x's f32[K / 128, M] transposed, w's f32[G, N / 128, K / 128]), x and w
    are e4m3 (w transposed) and each 128-deep step's product is scaled into the float32
    accumulator: `grouped_matmul_fp8` (with several pairs, K is theirs in turn: the pairs'
    scales side by side); gated, one w scales array a weight (`grouped_matmul_fp8_gated`).

    A tile's steps (block_k of K each) go through a pipeline of `max_concurrent_steps` stages:
    one of its own for each tile, or with `Config.across_tiles` one ring of stages for all of a
    program's tiles, into which the memory warpgroup loads the next tiles' first steps while
    the compute warpgroups finish a tile and store it.

    With `gated` (an activation of `GATED_ACTIVATIONS`), xs is [x] and ws [w_gate, w_up]: each
    step loads x's tile once and both weights' (ring only), each compute warpgroup keeps an
    accumulator of each product, and the epilogue stores (act(gate) * up, gate, up)
    (`grouped_matmul_gated`)."""
    num_rows = xs[0].shape[0]
    num_groups = ws[0].shape[0]
    width = ws[0].shape[1] if transpose_w else ws[0].shape[2]
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    pair_steps = [x.shape[1] // bk for x in xs]  # each product's steps, in turn
    products_of = len(ws) if gated else 1  # accumulators a row block: one per weight if gated
    steps, stages = sum(pair_steps), config.max_concurrent_steps
    # Each compute warpgroup's part of the block_m x (2 block_n) tile: wm x wn.
    wm, wn = (bm // 2, 2 * bn) if config.split == "m" else (bm, bn)
    em, en = min(config.epilogue_m, wm), min(config.epilogue_n, wn)
    sub = config.acc_rows or wm  # rows of one accumulator
    subs = wm // sub
    items = schedule.work_items(group_sizes, num_rows, bm).reshape(-1)
    num_items = items.shape[0] // 4
    xs = [_pad_for_blocks(x, bm, interpret) for x in xs]
    scaled = scales is not None
    if scaled:  # x's rows padded as x is (`_pad_for_blocks`)
        scales = (jnp.pad(scales[0], ((0, 0), (0, xs[0].shape[0] - scales[0].shape[1]))),
                  *scales[1:])
    # Split by rows into two accumulators each, an item whose rows all lie in the block's first
    # wm is shared out at wm / 2 rows a warpgroup, one accumulator each, instead of leaving the
    # second warpgroup without products (with block_m 256, a group of up to about 120 rows).
    balanced = config.split == "m" and subs == 2 and not scaled
    cluster = config.cluster_n
    col_blocks = width // (2 * bn * cluster)
    num_tiles = num_items * col_blocks
    in_dtype = xs[0].dtype
    dtype = out_dtype or in_dtype
    swizzle = plgpu.find_swizzle(bk * jnp.dtype(in_dtype).itemsize * 8)
    out_swizzle = plgpu.find_swizzle(en * jnp.dtype(dtype).itemsize * 8)
    transforms = (plgpu.TilingTransform((8, swizzle // jnp.dtype(in_dtype).itemsize)),
                  plgpu.SwizzleTransform(swizzle))
    w_block = (2 * bn, bk) if transpose_w else (bk, 2 * bn)

    # Register layouts (the interpreter has none).
    laid_out = (lambda value, _: value) if interpret else plgpu.layout_cast

    def body(items_gmem, *refs):
        # x, the weights, (FP8) x's scales and each weight's, and the outputs (gated: h, gate,
        # up); or the pairs (x, w) in turn, their scales, the output.
        num_in = 1 + len(ws) if gated else 2 * len(xs)
        num_scales = len(scales) if scaled else 0
        if gated:
            x_gmems, w_gmems = refs[:1], refs[1:num_in]
        else:
            x_gmems, w_gmems = refs[0:num_in:2], refs[1:num_in:2]
        scale_gmem = refs[num_in:num_in + num_scales]
        out_gmems = refs[num_in + num_scales:]
        x_gmem, w_gmem = x_gmems[0], w_gmems[0]
        wg = lax.axis_index("wg")

        def tile_of(tile) -> _Tile:
            """Tile -> (item, column block): bands of `band` items, column-major inside."""
            first_item = tile // (config.band * col_blocks) * config.band
            in_band = tile % (config.band * col_blocks)
            band_items = jnp.minimum(config.band, num_items - first_item)
            item = first_item + in_band % band_items
            col = (in_band // band_items) * cluster + (
                lax.axis_index("cluster") if cluster > 1 else 0)
            row = pl.multiple_of(items_gmem[4 * item + 1], schedule.ROW_ALIGN)
            first_row, end_row = items_gmem[4 * item + 2], items_gmem[4 * item + 3]
            wg_row = row
            if config.split == "m":  # the warpgroup's `share` of rows: wm, or see `balanced`
                share = jnp.where(end_row - row <= wm, wm // 2, wm) if balanced else wm
                wg_row = row + wg * share
                end_row = jnp.minimum(end_row, wg_row + share)
            return _Tile(group=items_gmem[4 * item], row=row, col=col, wg_row=wg_row,
                         wg_col=col * 2 * bn + (0 if config.split == "m" else wg * bn),
                         first_row=first_row - wg_row, end_row=end_row - wg_row)

        def multiplies(t: _Tile):
            return (t.group >= 0) & (t.group < num_groups)

        def operand_tiles(t: _Tile, x_smem, w_smem):
            """This warpgroup's x rows and w columns of the step's tiles."""
            if config.split == "m":
                return (x_smem.at[pl.ds(t.wg_row - t.row, wm)],
                        plgpu.transpose_ref(w_smem, (1, 0)) if transpose_w else w_smem)
            return x_smem, (plgpu.transpose_ref(w_smem.at[pl.ds(wg * bn, bn)], (1, 0))
                            if transpose_w else w_smem.at[:, pl.ds(wg * bn, bn)])

        def issue(t: _Tile, x_smem, w_smem, acc_refs):
            """One step's products into this warpgroup's accumulators, not waited for.

            An accumulator whose rows hold none of the group's (past a short group's end, or
            the rows of the group before) gets no products: its rows are never stored, and the
            other warpgroup has the tensor cores to itself. Gated, `w_smem` is a list of the
            weights' tiles, the products of weight p going into acc_refs[p * subs:]."""
            tiles = [operand_tiles(t, x_smem, w) for w in (w_smem if gated else [w_smem])]

            def products(which):
                for p, (x_tile, w_tile) in enumerate(tiles):
                    for s in which:
                        plgpu.wgmma(acc_refs[p * subs + s], x_tile.at[pl.ds(s * sub, sub)]
                                    if subs > 1 else x_tile, w_tile)

            holds = [(t.end_row > s * sub) & (t.first_row < (s + 1) * sub) for s in range(subs)]
            if config.split == "n" and subs == 1:
                products([0])  # all of the block's rows: it holds some of the group's
            elif subs == 1:
                pl.when(holds[0])(lambda: products([0]))
            else:
                every = functools.reduce(jnp.logical_and, holds)
                pl.when(every)(lambda: products(range(subs)))
                for s in range(subs):
                    pl.when(holds[s] & ~every)(lambda s=s: products([s]))

        def w_scale_of(t: _Tile, k, product=0):
            """The w block's scale of step k (`product`: which weight's; gated: 0 gate, 1 up)."""
            return scale_gmem[1 + product][t.group, t.wg_col // FP8_TILE, k]

        def scaled_step(t: _Tile, w_scale, x_smem, w_smem, x_scale_smem, accs):
            """accs + (x tile @ w tile) * (row scales x the w block's scale `w_scale`): one step
            of 128, the products of each accumulator's rows (`Config.acc_rows`; accs one a
            `sub` rows) into a float32 accumulator of their own, in turn (DeepSeek-V3's
            promotion of each K block into float32): with 64 rows, one such accumulator of
            64 x wn serves all of a warpgroup's rows."""
            x_tile, w_tile = operand_tiles(t, x_smem, w_smem)
            first = t.wg_row - t.row if config.split == "m" else 0

            def block(rows):
                def product(part_ref):
                    plgpu.wgmma(part_ref, rows, w_tile)
                    return part_ref[...]

                return pl.run_scoped(product, plgpu.ACC((sub, wn)))

            summed = []
            for s, acc in enumerate(accs):
                part = block(x_tile.at[pl.ds(s * sub, sub)] if subs > 1 else x_tile)
                rows = x_scale_smem.at[0, pl.ds(first + s * sub, sub)]
                row_scales = laid_out(rows[...], plgpu.Layout.WGMMA.reduce(1)) * w_scale
                summed.append(acc + part * lax.broadcast_in_dim(row_scales, (sub, wn), [0]))
            return tuple(summed)

        def zero_acc():
            """A warpgroup's float32 sum of one product: an array a `sub` rows."""
            return tuple(laid_out(jnp.zeros((sub, wn), jnp.float32), plgpu.Layout.WGMMA)
                         for _ in range(subs))

        acc_shapes = [plgpu.ACC((sub, wn)) for _ in range(subs * products_of)]

        def pipeline(mma, compute_context, col=0):
            """A tile's own pipeline (without `Config.across_tiles`)."""
            w_spec = plgpu.BlockSpec(w_block, (lambda kk: (col, kk)) if transpose_w else
                                     (lambda kk: (kk, col)), transforms=transforms)
            # FP8: the x tile's row scales of each step, [1, block_m] of the transposed scales.
            scale_specs = [plgpu.BlockSpec((1, bm), lambda kk: (kk, 0))] if scaled else []
            return plgpu.emit_pipeline_warp_specialized(
                mma,
                grid=(steps,),
                memory_registers=40,
                in_specs=[plgpu.BlockSpec((bm, bk), lambda kk: (0, kk), transforms=transforms,
                                          collective_axes=("cluster",) if cluster > 1 else ()),
                          w_spec, *scale_specs],
                wg_axis="wg",
                num_compute_wgs=2,
                max_concurrent_steps=stages,
                compute_context=compute_context,
            )

        if config.across_tiles:  # one ring of stages, loaded and released by barriers
            stage_smem = dict(
                x=plgpu.SMEM((stages, bm, bk), in_dtype, transforms=transforms),
                w=plgpu.SMEM((stages, *w_block), in_dtype, transforms=transforms),
                # Gated: the up weight's tile of each step.
                w_up=plgpu.SMEM((stages, *w_block), in_dtype, transforms=transforms)
                if gated else None,
                scale=plgpu.SMEM((stages, 1, bm), jnp.float32) if scaled else None,
                loaded=plgpu.Barrier(num_arrivals=2 + bool(gated) + scaled,
                                     num_barriers=stages),
                consumed=plgpu.Barrier(num_arrivals=2, num_barriers=stages))
        else:  # allocations depend on the block shapes only
            ignore = lambda *_, **__: None  # noqa: E731
            stage_smem = pipeline(ignore, ignore).get_allocations(
                x_gmem.at[pl.ds(0, bm)], w_gmem.at[0],
                *([scale_gmem[0].at[:, pl.ds(0, bm)]] if scaled else []))

        @functools.partial(
            pl.run_scoped,
            stage_smem=stage_smem,
            out_smem=plgpu.SMEM((2, 2, em, en), dtype),
            full_smem=plgpu.SMEM((2, 2, em, en), dtype, transforms=(
                plgpu.TilingTransform((8, out_swizzle // jnp.dtype(dtype).itemsize)),
                plgpu.SwizzleTransform(out_swizzle))) if config.swizzled_epilogue else None,
            collective_axes="wg",
        )
        def _scope(stage_smem, out_smem, full_smem):
            def epilogue(t: _Tile, tile_values, out_gmem=out_gmems[0]):
                """Stores rows [first_row, end_row) of this warpgroup's wm x wn tile."""
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                for i in range(wm // em):
                    lo = jnp.clip(t.first_row - i * em, 0, em)
                    hi = jnp.clip(t.end_row - i * em, 0, em)
                    for j in range(wn // en):
                        slot = (i * (wn // en) + j) % 2
                        plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                        values = tile_values(i, j)

                        def store_rows(values=values, i=i, j=j, slot=slot, lo=lo, hi=hi):
                            out_smem[wg, slot] = values
                            plgpu.commit_smem()
                            _store_rows(out_smem.at[wg, slot], out_gmem, t.wg_row + i * em,
                                        lo, jnp.maximum(hi - lo, 0), t.wg_col + j * en,
                                        min(em, num_rows), en, commit_group=False)

                        if full_smem is None:
                            store_rows()
                        else:
                            full = (lo == 0) & (hi == em)
                            pl.when(~full)(store_rows)

                            @pl.when(full)
                            def _(values=values, i=i, j=j, slot=slot):
                                full_smem[wg, slot] = values
                                plgpu.commit_smem()
                                plgpu.copy_smem_to_gmem(
                                    full_smem.at[wg, slot],
                                    out_gmem.at[pl.ds(t.wg_row + i * em, em),
                                                pl.ds(t.wg_col + j * en, en)],
                                    commit_group=False)
                        plgpu.commit_smem_to_gmem_group()

            def acc_piece(accs, i, j):
                """The [em, en] piece at rows i * em, columns j * en of a warpgroup's sum held
                as arrays of `sub` rows each."""
                acc = accs[i * em // sub]
                return acc[i * em % sub:i * em % sub + em, j * en:(j + 1) * en]

            def store_accs(t: _Tile, acc_refs):
                values = [ref[...] for ref in acc_refs]
                if gated:
                    store_gated(t, values)
                else:
                    store_acc(t, values)

            def store_gated(t: _Tile, accs):
                """Gate and up from their float32 accumulators (the gate's `subs`, then the
                up's), then act(gate) * up computed a piece at a time."""
                gate, up = accs[:subs], accs[subs:]
                act = GATED_ACTIVATIONS[gated]
                epilogue(t, lambda i, j: acc_piece(gate, i, j).astype(dtype), out_gmems[1])
                epilogue(t, lambda i, j: acc_piece(up, i, j).astype(dtype), out_gmems[2])
                epilogue(t, lambda i, j: (act(acc_piece(gate, i, j))
                                          * acc_piece(up, i, j)).astype(dtype), out_gmems[0])

            def store_acc(t: _Tile, accs):
                """A float32 sum of `zero_acc`'s form, rounded to the output's dtype."""
                accs = [acc.astype(dtype) for acc in accs]
                epilogue(t, lambda i, j: acc_piece(accs, i, j))

            def store_zeros(t: _Tile):
                """The rows past the last group (of each output)."""
                @pl.when(t.group == num_groups)
                def _():
                    for out in out_gmems:
                        epilogue(t, lambda i, j: jnp.zeros((em, en), dtype), out)

            def pipelines():
                """A pipeline of its own for each tile (`plgpu.emit_pipeline_warp_specialized`)."""
                @plgpu.nd_loop((num_tiles,), collective_axes="sm")
                def _tile(info):
                    t = tile_of(info.index[0])

                    def compute_context(eval_pipeline):
                        def multiply(acc_refs):
                            eval_pipeline(tuple(acc_refs))
                            store_accs(t, acc_refs)

                        pl.run_scoped(multiply, acc_shapes)

                    def mma(_, x_smem, w_smem, acc_refs):
                        issue(t, x_smem, w_smem, acc_refs)
                        plgpu.wgmma_wait(0)
                        return acc_refs

                    @pl.when(multiplies(t))
                    def _product():
                        if scaled:
                            pipeline(lambda indices, *refs: scaled_step(
                                         t, w_scale_of(t, indices[0]), *refs),
                                     lambda evaluate: store_acc(t, evaluate(zero_acc())), t.col)(
                                x_gmem.at[pl.ds(t.row, bm)], w_gmem.at[t.group],
                                scale_gmem[0].at[:, pl.ds(t.row, bm)], allocations=stage_smem)
                        else:
                            pipeline(mma, compute_context, t.col)(
                                x_gmem.at[pl.ds(t.row, bm)], w_gmem.at[t.group],
                                allocations=stage_smem)

                    pl.when(wg < 2)(lambda: store_zeros(t))

            def ring():
                """One ring of stages for all of a program's tiles (`Config.across_tiles`): the
                memory warpgroup loads step after step of tile after tile, each stage as soon as
                both compute warpgroups have released it."""
                x_smem, w_smem, w_up_smem, scale_smem = (
                    stage_smem[name] for name in ("x", "w", "w_up", "scale"))
                loaded, consumed = stage_smem["loaded"], stage_smem["consumed"]

                def step_loads(t: _Tile, count, k):
                    slot = _free_stage(consumed, count * steps + k, stages)
                    cols = pl.ds(pl.multiple_of(t.col * 2 * bn, 2 * bn), 2 * bn)

                    def pair_loads(x_gmem, w_gmem, kk):
                        ks = pl.ds(pl.multiple_of(kk * bk, bk), bk)
                        plgpu.copy_gmem_to_smem(x_gmem.at[pl.ds(t.row, bm), ks],
                                                x_smem.at[slot], loaded.at[slot])
                        plgpu.copy_gmem_to_smem(w_gmem.at[t.group, cols, ks] if transpose_w else
                                                w_gmem.at[t.group, ks, cols], w_smem.at[slot],
                                                loaded.at[slot])

                    if gated:  # x's tile once, then the up weight's
                        pair_loads(x_gmem, w_gmem, k)
                        ks = pl.ds(pl.multiple_of(k * bk, bk), bk)
                        plgpu.copy_gmem_to_smem(w_gmems[1].at[t.group, cols, ks] if transpose_w
                                                else w_gmems[1].at[t.group, ks, cols],
                                                w_up_smem.at[slot], loaded.at[slot])
                    elif len(xs) == 1:
                        pair_loads(x_gmem, w_gmem, k)
                    else:  # the step of the pair whose steps [first, first + count) hold k
                        first = 0
                        for x_pair, w_pair, count in zip(x_gmems, w_gmems, pair_steps):
                            pl.when((k >= first) & (k < first + count))(functools.partial(
                                pair_loads, x_pair, w_pair, k - first))
                            first += count
                    if scaled:
                        plgpu.copy_gmem_to_smem(scale_gmem[0].at[pl.ds(k, 1), pl.ds(t.row, bm)],
                                                scale_smem.at[slot], loaded.at[slot])

                def tile_products(t: _Tile, count):
                    first = count * steps

                    def arrived(k):
                        """The stage of the tile's step k, once loaded."""
                        slot = (first + k) % stages
                        plgpu.barrier_wait(loaded.at[slot])
                        return slot

                    if scaled:  # one accumulator a product (gated: gate's, up's)
                        weights = [w_smem, w_up_smem] if gated else [w_smem]

                        def w_scales(k):
                            return tuple(w_scale_of(t, k, p) for p in range(len(weights)))

                        def scaled_product(k, carry):
                            # Step k + 1's w scales are loaded a step ahead: a load from
                            # global memory waited for inside the step would hold up its
                            # products' scaling.
                            accs, scales_k = carry
                            scales_next = w_scales(jnp.minimum(k + 1, steps - 1))
                            slot = arrived(k)
                            accs = tuple(scaled_step(t, scale, x_smem.at[slot], w.at[slot],
                                                     scale_smem.at[slot], acc)
                                         for w, acc, scale in zip(weights, accs, scales_k))
                            plgpu.barrier_arrive(consumed.at[slot])
                            return accs, scales_next

                        accs, _ = lax.fori_loop(0, steps, scaled_product, (
                            tuple(zero_acc() for _ in weights), w_scales(0)))
                        if gated:  # the gate's accumulators, then the up's
                            store_gated(t, [part for acc in accs for part in acc])
                        else:
                            store_acc(t, accs[0])
                        return

                    def multiply(acc_refs):
                        @pl.loop(0, steps)
                        def _(k):
                            slot = arrived(k)
                            issue(t, x_smem.at[slot], [w_smem.at[slot], w_up_smem.at[slot]]
                                  if gated else w_smem.at[slot], acc_refs)
                            # Released as soon as its products finish (the other warpgroup
                            # keeps the tensor cores busy meanwhile): holding it until the
                            # next step's products are issued would leave a ring of three
                            # stages one load ahead instead of two.
                            plgpu.wgmma_wait(0)
                            plgpu.barrier_arrive(consumed.at[slot])

                        store_accs(t, acc_refs)

                    pl.run_scoped(multiply, acc_shapes)

                def each_tile(work, other=lambda t: None):
                    """`work(tile, count)` for each of the program's tiles that multiplies,
                    `count` those before it, and `other(tile)` for every tile; returns the
                    number that multiply."""
                    def tile(info, carry):
                        t = tile_of(info.index[0])
                        multiplied = multiplies(t)
                        pl.when(multiplied)(lambda: work(t, carry))
                        other(t)
                        return carry + multiplied.astype(jnp.int32)

                    return plgpu.nd_loop((num_tiles,), collective_axes="sm",
                                         init_carry=jnp.int32(0))(tile)

                @pl.when(wg == 2)
                def _memory():
                    plgpu.set_max_registers(40, action="decrease")
                    total = each_tile(lambda t, count: pl.loop(0, steps)(
                        functools.partial(step_loads, t, count)))
                    _drain(consumed, total * steps, stages)

                @pl.when(wg < 2)
                def _compute():
                    plgpu.set_max_registers(232, action="increase")

                    each_tile(tile_products, store_zeros)

            (ring if config.across_tiles else pipelines)()
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    operands = [xs[0], *ws] if gated else [a for pair in zip(xs, ws) for a in pair]
    out_type = jax.ShapeDtypeStruct((num_rows, width), dtype)
    return _persistent(body, (out_type,) * 3 if gated else out_type, interpret,
                       name=name or SCOPES["dx" if transpose_w else "forward"], cluster=cluster,
                       warpgroups=3)(items, *operands, *(scales if scaled else ()))


class _Tile(NamedTuple):
    """One output tile of the forward/dx kernel as a warpgroup sees it: the item's group, its
    block's first row, the column block, this warpgroup's first row and column, and the item's
    rows [first_row, end_row) relative to the warpgroup's first row (split by rows, up to the
    end of the warpgroup's share)."""
    group: jax.Array
    row: jax.Array
    col: jax.Array
    wg_row: jax.Array
    wg_col: jax.Array
    first_row: jax.Array
    end_row: jax.Array


def _free_stage(consumed, position, stages: int):
    """The stage of ring position `position`, once it is free: the first `stages` positions
    are; each later one waits until the products of the position `stages` before it have
    released the stage (`consumed`)."""
    slot = position % stages

    @pl.when(position >= stages)
    def _():
        plgpu.barrier_wait(consumed.at[slot])

    return slot


def _store_pieces(acc, out_smem, destination, piece: tuple[int, int]):
    """Stores a warpgroup's result `acc` [R, C] (in the output's dtype) piece by piece through
    its buffers `out_smem` [B, em, en] (one or two), without waiting for the stores:
    `destination(i, j)` is the gmem ref of piece (i, j), rows i * em .., columns j * en ...
    Each buffer is reused once its last store has read it (with two buffers and an odd number
    of pieces, the first piece's buffer was the last one used, by the result before)."""
    em, en = piece
    buffers = out_smem.shape[0]
    pieces = (acc.shape[0] // em) * (acc.shape[1] // en)
    for i in range(acc.shape[0] // em):
        for j in range(acc.shape[1] // en):
            index = i * (acc.shape[1] // en) + j
            slot = index % buffers
            alone = buffers == 1 or (index == 0 and pieces % 2)
            plgpu.wait_smem_to_gmem(0 if alone else 1, wait_read_only=True)
            out_smem[slot] = acc[i * em:(i + 1) * em, j * en:(j + 1) * en]
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[slot], destination(i, j))


def _drain(barriers, total, ring: int):
    """A ring's last releases: waited for, so that no barrier is left with a phase unobserved
    (`total` positions went through a ring of `ring` stages)."""
    @pl.loop(jnp.maximum(total - ring, 0), total)
    def _(position):
        plgpu.barrier_wait(barriers.at[position % ring])


FP8_TILE = 128  # the scales' tiles: 1 x 128 of x's rows, 128 x 128 of w


def check_fp8_shapes(x, x_scales, w, w_scales, group_sizes, *, config: Config):
    """Raises a ValueError/TypeError naming what `grouped_matmul_fp8` cannot take."""
    if x.ndim != 2 or w.ndim != 3:
        raise ValueError(f"x must be [M, K] and w [G, N, K], got {x.shape} and {w.shape}")
    if x.dtype != jnp.float8_e4m3fn or w.dtype != jnp.float8_e4m3fn:
        raise TypeError(f"x and w must be float8_e4m3fn, got {x.dtype} and {w.dtype}")
    (num_rows, depth), (num_groups, width) = x.shape, w.shape[:2]
    if w.shape[2] != depth:
        raise ValueError(f"w [G, N, K] must have x's K ({depth}) last, got {w.shape}")
    if depth % FP8_TILE or width % FP8_TILE:
        raise ValueError(f"K={depth} and N={width} must be multiples of {FP8_TILE}")
    want = {"x_scales": (num_rows, depth // FP8_TILE),
            "w_scales": (num_groups, width // FP8_TILE, depth // FP8_TILE)}
    for name, scales in (("x_scales", x_scales), ("w_scales", w_scales)):
        if scales.shape != want[name] or scales.dtype != jnp.float32:
            raise ValueError(f"{name} must be float32{list(want[name])}, got "
                             f"{scales.dtype}{list(scales.shape)}")
    if group_sizes.shape != (num_groups,):
        raise ValueError(f"group_sizes must be [{num_groups}], got {group_sizes.shape}")
    warpgroup_n = config.block_n * (2 if config.split == "m" else 1)
    if not (config.warp_specialized and config.block_k == FP8_TILE
            and FP8_TILE % warpgroup_n == 0):
        raise ValueError(f"the FP8 kernel takes warp-specialized configs with "
                         f"block_k={FP8_TILE} and each warpgroup's columns inside one scale "
                         f"block (block_n 64 or 128 split by columns, 64 by rows), got {config}")
    as_bf16 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731
    check_shapes(as_bf16(x.shape), as_bf16(w.shape), group_sizes, transpose_w=True,
                 config=config)


def grouped_matmul_fp8(x, x_scales, w, w_scales, group_sizes, *, config: Config,
                       out_dtype=jnp.bfloat16, name: str | None = None,
                       interpret: bool = False):
    """y[M, N]: rows of group g of (x * x_scales) @ (w[g] * w_scales[g])^T, e4m3 operands
    (DeepSeek-V3's FP8 recipe), rows past the groups zero; or the sum of several such products
    of the same rows and groups (x, x_scales, w and w_scales sequences of one length: the gate
    and up products' dx of a SwiGLU expert, dg @ w_gate[g]^T + du @ w_up[g]^T, written once).

    Each 128-deep step's products go into a float32 accumulator of their own, which is then
    scaled by its rows' x scales times the w block's scale and added to the tile's float32
    sum (across the products of a sum, each product's steps in turn); the sum is rounded once
    to `out_dtype`.

    Args:
      x: e4m3[M, K]; x_scales: f32[M, K / 128], one per 1 x 128 tile of x's rows.
      w: e4m3[G, N, K], K-major (Hopper's FP8 products read both operands K-major): for
        y = x @ v[g] with v [G, K, N], w is v transposed; for dx = dy @ v[g]^T, w is v itself.
      w_scales: f32[G, N / 128, K / 128], one per 128 x 128 block of w[g].
      group_sizes: i32[G]. config: warp-specialized, block_k 128 (see `check_fp8_shapes`);
        for a sum of products with `across_tiles` (the memory warpgroup loads each step from
        its own pair).
      name: the kernel's name in a profile.
    """
    pairs = fp8_pairs(x, x_scales, w, w_scales)
    for pair in pairs:
        check_fp8_shapes(*pair, group_sizes, config=config)
    xs, x_scales, ws, w_scales = (list(part) for part in zip(*pairs))
    if len(pairs) > 1:
        if any(a.shape[0] != xs[0].shape[0] or b.shape[:2] != ws[0].shape[:2]
               for a, b in zip(xs, ws)):
            raise ValueError(f"a sum of FP8 products takes x's of the same rows and w's of the "
                             f"same groups and N, got {[a.shape for a in xs]} and "
                             f"{[b.shape for b in ws]}")
        if not config.across_tiles:
            raise ValueError(f"a sum of {len(pairs)} FP8 products needs a config with "
                             f"across_tiles=True, got {config}")
    ws, transpose_w = _k_major(ws, interpret)
    # The pairs' scales side by side along K, as their steps follow one another.
    scales = (jnp.concatenate([s.T for s in x_scales]), jnp.concatenate(w_scales, axis=2))
    return _grouped_matmul_ws(xs, ws, group_sizes, transpose_w=transpose_w, config=config,
                              interpret=interpret, scales=scales, out_dtype=out_dtype,
                              name=name)


def _k_major(ws, interpret: bool):
    """(ws, transpose_w) for `_grouped_matmul_ws`: the FP8 kernels' e4m3 weights [G, N, K]
    read transposed, or on the interpreter, which has no transposed shared-memory views,
    transposed in memory ([G, K, N])."""
    if interpret:
        return [jnp.swapaxes(w, 1, 2) for w in ws], False
    return list(ws), True


def grouped_matmul_fp8_gated(x, x_scales, w_gate, w_gate_scales, w_up, w_up_scales,
                             group_sizes, *, activation: str = "silu", config: Config,
                             out_dtype=jnp.bfloat16, name: str | None = None,
                             interpret: bool = False):
    """(h, gate, up), each [M, N] in `out_dtype`: gate and up the FP8 products of x with
    w_gate and w_up (`grouped_matmul_fp8`'s, the same operands and scales), h = act(gate) * up
    from their float32 sums, in one kernel: each step of x is loaded once for both products
    (the FP8 counterpart of `grouped_matmul_gated`). Rows past the groups are zero.

    Args:
      x: e4m3[M, K]; x_scales: f32[M, K / 128].
      w_gate, w_up: e4m3[G, N, K], K-major; w_gate_scales, w_up_scales: f32[G, N / 128,
        K / 128] (`jep.fp8.QuantizedWeight`'s q_t and scales_t of each).
      group_sizes: i32[G]. activation: as `grouped_matmul_gated`'s.
      config: as `grouped_matmul_fp8`'s, with `across_tiles` (the ring's stages hold a step of
        x and of both weights).
    """
    if activation not in GATED_ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(GATED_ACTIVATIONS)}, got "
                         f"{activation!r}")
    for w, w_scales in ((w_gate, w_gate_scales), (w_up, w_up_scales)):
        check_fp8_shapes(x, x_scales, w, w_scales, group_sizes, config=config)
    if w_up.shape != w_gate.shape:
        raise ValueError(f"w_up must be w_gate's shape, got {w_up.shape} and {w_gate.shape}")
    if not config.across_tiles:
        raise ValueError(f"the gated FP8 kernel needs a config with across_tiles=True (one "
                         f"ring of stages), got {config}")
    ws, transpose_w = _k_major([w_gate, w_up], interpret)
    return _grouped_matmul_ws([x], ws, group_sizes, transpose_w=transpose_w, config=config,
                              interpret=interpret, scales=(x_scales.T, w_gate_scales,
                                                           w_up_scales),
                              out_dtype=out_dtype, name=name, gated=activation)


def fp8_pairs(x, x_scales, w, w_scales):
    """[(x, x_scales, w, w_scales)] of one product, or of each of a sum's (sequences)."""
    parts = (x, x_scales, w, w_scales)
    if not any(isinstance(a, (list, tuple)) for a in parts):
        return [parts]
    if (not all(isinstance(a, (list, tuple)) for a in parts)
            or len({len(a) for a in parts}) != 1 or not parts[0]):
        lengths = [len(a) if isinstance(a, (list, tuple)) else "an array" for a in parts]
        raise ValueError(f"a sum of FP8 products takes x, x_scales, w and w_scales as sequences "
                         f"of one length (at least one), got {lengths}")
    return list(zip(*parts))


def _store_rows(smem, gmem, block_row, offset, count, col, max_rows, width, commit_group=True):
    """Copies rows [offset, offset + count) of the tile in `smem` to gmem rows block_row + offset...

    TMA copies have static shapes, so `count` (1..max_rows, known only at run time) is stored as
    the sum of its binary digits: one copy of 2^i rows for each bit i set, largest first.
    """
    rows = 1 << (max_rows.bit_length() - 1)
    while rows >= 1:
        @pl.when((count & rows) != 0)
        def _(rows=rows, offset=offset):
            plgpu.copy_smem_to_gmem(
                smem.at[pl.ds(offset, rows)],
                gmem.at[pl.ds(block_row + offset, rows), pl.ds(col, width)],
                commit_group=commit_group)

        offset = offset + (count & rows)
        rows //= 2


def group_rows(group_sizes, num_rows: int):
    """(starts, ends), i32[G] each: the rows [start, end) of each group, clipped to num_rows."""
    ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes.astype(jnp.int32), 0)), num_rows)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    return starts, ends


def _segment_rows(group_sizes, chunk_rows):
    """(starts, ends), i32[G, C] each: the rows [start, end) of group g in chunk c, where x's
    rows are C chunks one after another, chunk c `chunk_rows[c]` rows grouped by
    group_sizes[c] (i32[C, G])."""
    starts, ends, offset = [], [], 0
    for c, rows in enumerate(chunk_rows):
        start, end = group_rows(group_sizes[c], rows)
        starts.append(start + offset)
        ends.append(end + offset)
        offset += rows
    return jnp.stack(starts, axis=1), jnp.stack(ends, axis=1)


def _group_table(starts, ends, block_rows: int):
    """i32[4 G C]: (first row, end row, first row block, number of row blocks) of each segment
    (`_segment_rows`), group-major."""
    first_block = starts // block_rows
    blocks = jnp.where(ends > starts, (ends - 1) // block_rows - first_block + 1, 0)
    return jnp.stack([starts, ends, first_block, blocks], axis=-1).reshape(-1)


def dw_tile_n(config: DwConfig) -> int:
    """The N width of one output tile of the weight gradient: 2 block_n warp-specialized."""
    return config.block_n * (2 if config.warp_specialized else 1)


def dw_run_k(config: DwConfig, depth: int) -> int:
    """K blocks of one run of the warp-specialized weight gradient (`DwConfig.run_k_blocks`):
    1 without resident dy rows."""
    if not config.resident_steps:
        return 1
    return config.run_k_blocks or depth // config.block_k


def check_dw_shapes(x, dy, group_sizes, *, config: DwConfig):
    """Raises a ValueError/TypeError naming what the weight-gradient kernel cannot take."""
    if x.ndim != 2 or dy.ndim != 2 or x.shape[0] != dy.shape[0]:
        raise ValueError(f"x must be [M, K] and dy [M, N], got {x.shape} and {dy.shape}")
    if x.dtype != dy.dtype or x.dtype not in (jnp.bfloat16, jnp.float16):
        raise TypeError(f"x and dy must both be bf16 or both f16, got {x.dtype} and {dy.dtype}")
    if group_sizes.ndim not in (1, 2):
        raise ValueError(f"group_sizes must be [G] or [C, G], got {group_sizes.shape}")
    if not isinstance(config, DwConfig):
        raise TypeError(f"config must be a DwConfig (the weight gradient's tiles), got "
                        f"{type(config).__name__}")
    depth, width = x.shape[1], dy.shape[1]
    if depth % config.block_k or width % dw_tile_n(config):
        raise ValueError(f"K={depth} must be a multiple of block_k={config.block_k} and N={width} "
                         f"of the tile width {dw_tile_n(config)} (the weight gradient's tiles)")
    if depth % (config.block_k * dw_run_k(config, depth)):
        raise ValueError(f"K={depth} must be a multiple of block_k x run_k_blocks = "
                         f"{config.block_k * config.run_k_blocks} (the weight gradient's runs)")


def grouped_matmul_dw(x, dy, group_sizes, *, config: DwConfig = DwConfig(), out_dtype=None,
                      chunk_rows: tuple[int, ...] | None = None, interpret: bool = False):
    """dw[G, K, N]: dw[g] = x[rows of g]^T @ dy[rows of g] (zero for an empty group).

    The rows of a group are the contraction, accumulated in float32 and rounded once to
    `out_dtype` (x's dtype by default). Output tiles are `block_k` x `dw_tile_n(config)`; K must
    be a multiple of block_k and N of the tile width; rows go `block_rows` a step.

    With `chunk_rows` (C static row counts, summing to at most M), x and dy are C chunks of
    rows one after another, chunk c grouped by group_sizes[c] (i32[C, G]): a group's rows are
    then its rows of every chunk, all summed into its one gradient (a layer run in chunks).

    Where a group's row blocks reach into its neighbours, one operand's rows outside the group
    are zeroed in shared memory (x's in the one-warpgroup kernel, dy's in the warp-specialized
    one), so the other's rows outside every group must be finite (zero times inf is a NaN).
    """
    check_dw_shapes(x, dy, group_sizes, config=config)
    if chunk_rows is None:
        if group_sizes.ndim != 1:
            raise ValueError(f"group_sizes must be [G] without chunk_rows, got {group_sizes.shape}")
        group_sizes, chunk_rows = group_sizes[None], (x.shape[0],)
    elif group_sizes.shape[0] != len(chunk_rows) or sum(chunk_rows) > x.shape[0]:
        raise ValueError(f"group_sizes must be [C, G] for the C={len(chunk_rows)} chunks of "
                         f"chunk_rows={chunk_rows} (at most M={x.shape[0]} rows in all), got "
                         f"{group_sizes.shape}")
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    segments = _segment_rows(group_sizes, chunk_rows)
    if config.warp_specialized:
        return _grouped_matmul_dw_ws(x, dy, segments, config=config, out_dtype=out_dtype,
                                     interpret=interpret)
    num_rows, depth = x.shape
    width = dy.shape[1]
    num_groups, num_chunks = segments[0].shape
    br, bk, bn = config.block_rows, config.block_k, config.block_n
    table = _group_table(*segments, br)
    k_blocks, n_blocks = depth // bk, width // bn
    # The interpreter has no transposed shared-memory views: there x is transposed in memory
    # ([K, M]) and its tiles are read as they are.
    x_in = jnp.swapaxes(x, 0, 1) if interpret else x

    def body(table_gmem, x_gmem, dy_gmem, out_gmem):
        @plgpu.nd_loop((num_groups * k_blocks * n_blocks,), collective_axes="sm")
        def _tile(info):
            tile = info.index[0]
            group = tile // (k_blocks * n_blocks)
            ki = (tile // n_blocks) % k_blocks
            ni = tile % n_blocks

            def segment_product(acc_ref, c):
                """The group's rows of chunk c into the accumulator, in a pipeline of its own."""
                at = 4 * (group * num_chunks + c)
                start, end, first_block, blocks = (table_gmem[at + i] for i in range(4))

                def step(index, x_smem, dy_smem):
                    b = index[0]

                    @pl.when((b == 0) | (b == blocks - 1))
                    def _mask():
                        axis = 1 if interpret else 0
                        shape = (bk, br) if interpret else (br, bk)
                        row = lax.broadcasted_iota(jnp.int32, shape, axis)
                        if not interpret:
                            row = plgpu.layout_cast(row, plgpu.Layout.WGMMA)
                        row = row + (first_block + b) * br
                        keep = ((row >= start) & (row < end)).astype(x_smem.dtype)
                        x_smem[...] = x_smem[...] * keep
                        plgpu.commit_smem()

                    lhs = x_smem if interpret else plgpu.transpose_ref(x_smem, (1, 0))
                    plgpu.wgmma(acc_ref, lhs, dy_smem)

                x_spec = (plgpu.BlockSpec((bk, br), lambda b: (ki, first_block + b),
                                          delay_release=1) if interpret else
                          plgpu.BlockSpec((br, bk), lambda b: (first_block + b, ki),
                                          delay_release=1))

                @pl.when(blocks > 0)
                def _():
                    plgpu.emit_pipeline(
                        step,
                        grid=(blocks,),
                        in_specs=[x_spec, plgpu.BlockSpec((br, bn), lambda b: (first_block + b, ni),
                                                          delay_release=1)],
                        max_concurrent_steps=config.max_concurrent_steps,
                    )(x_gmem, dy_gmem)

            def multiply(acc_ref):
                for c in range(num_chunks):  # the group's rows of each chunk, into one sum
                    segment_product(acc_ref, c)
                return acc_ref[...]

            # Zero for a group with no rows: the accumulator starts at zero.
            acc = pl.run_scoped(multiply, plgpu.ACC((bk, bn)))

            @functools.partial(pl.run_scoped, out_smem=plgpu.SMEM((bk, bn), out_gmem.dtype))
            def _store(out_smem):
                out_smem[...] = acc.astype(out_smem.dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(
                    out_smem, out_gmem.at[group, pl.ds(ki * bk, bk), pl.ds(ni * bn, bn)])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    return _persistent(body, jax.ShapeDtypeStruct((num_groups, depth, width), out_dtype),
                       interpret, name=SCOPES["dw"])(table, x_in, dy)


def smem_transforms(minor: int, dtype):
    """The tiling and swizzle of a shared-memory tile whose rows are `minor` elements long."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(minor * itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _grouped_matmul_dw_ws(x, dy, segments, *, config, out_dtype, interpret):
    """`grouped_matmul_dw` for many small groups: one pipeline across all of a program's tiles.

    A tile is (group, K block of block_k, N block of 2 block_n); two compute warpgroups take
    block_n columns each. A program takes runs of tiles: a run is `dw_run_k` tiles along K of
    one group and N block (one tile without `resident_steps`), runs ordered group, K, N. A
    third warpgroup only issues TMA loads: for each tile in turn, the group's rows in steps of
    block_rows from the group's first row rounded down to a multiple of 8 (the tiling of the
    shared-memory tiles wants row offsets in multiples of 8), x's into a ring of
    `max_concurrent_steps` stages and dy's into a ring of `resident_steps` stages (or as many
    as x's), both running on from one tile into the next. dy's rows are loaded for the first
    tile of a run only where all of the group's steps fit dy's ring (they are then held until
    the run's last tile), else for every tile. With 128 rows a group a tile is two or three
    steps, and the loads of the next tiles are in flight while this one multiplies and while
    its result is stored.

    The compute warpgroups zero the rows of other groups (at most 7 before the group, and those
    past its end) in their own half of dy's first and last steps when they arrive, multiply
    (wgmma, float32 accumulators), and store their block_k x block_n result through a swizzled
    shared-memory tile in pieces of epilogue_k x epilogue_n without waiting for the stores: two
    buffers of a piece each, or with one piece the whole tile in one buffer, whose store is
    waited for only before the next tile's result goes there (after the next tile's products).
    An empty group's tiles are stored as zeros. A group's rows in several chunks (`segments`,
    from `_segment_rows`) are its segments: a tile's steps are those of each segment in turn,
    all into the one accumulator.
    """
    num_rows, depth = x.shape
    width = dy.shape[1]
    num_groups, num_chunks = segments[0].shape
    # bm: the K block of a tile (the wgmma's M); br: rows a step.
    bm, bn, br = config.block_k, config.block_n, config.block_rows
    stages = config.max_concurrent_steps
    dy_stages = config.resident_steps or stages
    em, en = min(config.epilogue_k, bm), min(config.epilogue_n, bn)
    pieces = (bm // em) * (bn // en)
    buffers = 1 if pieces == 1 else 2
    run_k = dw_run_k(config, depth)
    k_runs, n_blocks = depth // (bm * run_k), width // (2 * bn)
    num_runs = num_groups * k_runs * n_blocks
    dtype = x.dtype
    # i32[2 G C]: (first row, end row) of each group's segment in each chunk.
    bounds = jnp.stack(segments, axis=-1).reshape(-1)
    # The interpreter has no transposed shared-memory views: there x is transposed in memory
    # ([K, M]) and its tiles are read as they are.
    x_in = jnp.swapaxes(x, 0, 1) if interpret else x
    x_tile = (bm, br) if interpret else (br, bm)

    def body(bounds_gmem, x_gmem, dy_gmem, out_gmem):
        wg = lax.axis_index("wg")

        def run_of(info):
            """(group, its segments (`segment`), their steps in all, whether dy's rows stay
            for the run, the run's first K block, N block)."""
            run = info.index[0]
            group = run // (k_runs * n_blocks)
            segments = [segment(group, c) for c in range(num_chunks)]
            steps = sum(s[-1] for s in segments)
            kept = (steps <= config.resident_steps) if config.resident_steps else False
            return group, segments, steps, kept, run // n_blocks % k_runs * run_k, run % n_blocks

        def segment(group, c):
            """(first row loaded, the group's rows [start, end) in chunk c, steps)."""
            at = 2 * (group * num_chunks + c)
            start, end = bounds_gmem[at], bounds_gmem[at + 1]
            first_row = pl.multiple_of(start - start % 8, 8)
            steps = jnp.where(end > start, (end - first_row + br - 1) // br, 0)
            return first_row, start, end, steps

        def positions(j, steps, kept, dy_count):
            """Whether tile j of a run loads dy's rows, whether it releases them, and the
            position of its first step in dy's ring."""
            if not config.resident_steps:  # every tile loads and releases its own
                return True, True, dy_count
            loads = (j == 0) | ~kept
            return loads, (j == run_k - 1) | ~kept, jnp.where(loads, dy_count, dy_count - steps)

        @functools.partial(
            pl.run_scoped,
            x_smem=plgpu.SMEM((stages, *x_tile), dtype, transforms=smem_transforms(x_tile[1], dtype)),
            dy_smem=plgpu.SMEM((dy_stages, 2, br, bn), dtype, transforms=smem_transforms(bn, dtype)),
            out_smem=plgpu.SMEM((2, buffers, em, en), out_dtype,
                                transforms=smem_transforms(en, out_dtype)),
            x_loaded=plgpu.Barrier(num_arrivals=1, num_barriers=stages),
            x_consumed=plgpu.Barrier(num_arrivals=2, num_barriers=stages),
            dy_loaded=plgpu.Barrier(num_arrivals=2, num_barriers=dy_stages),
            dy_consumed=plgpu.Barrier(num_arrivals=2, num_barriers=dy_stages),
            collective_axes="wg",
        )
        def _scope(x_smem, dy_smem, out_smem, x_loaded, x_consumed, dy_loaded, dy_consumed):
            @pl.when(wg == 2)
            def _memory():
                plgpu.set_max_registers(40, action="decrease")

                def run_loads(info, carry):
                    group, segments, steps, kept, k0, ni = run_of(info)

                    def tile_loads(j, counts):
                        x_count, dy_count = counts
                        loads, _, dy_at = positions(j, steps, kept, dy_count)
                        cols = pl.ds(pl.multiple_of((k0 + j) * bm, bm), bm)
                        offset = 0
                        for first_row, _, _, segment_steps in segments:
                            lax.fori_loop(0, segment_steps, functools.partial(
                                step_loads, first_row, offset, cols, ni, loads, x_count, dy_at),
                                None)
                            offset = offset + segment_steps
                        return x_count + steps, dy_at + steps

                    return lax.fori_loop(0, run_k, tile_loads, carry)

                def step_loads(first_row, offset, cols, ni, loads, x_count, dy_at, b, carry):
                    rows = pl.ds(pl.multiple_of(first_row + b * br, 8), br)

                    @pl.when(loads)
                    def _():
                        slot = _free_stage(dy_consumed, dy_at + offset + b, dy_stages)
                        for half in range(2):
                            half_cols = pl.multiple_of((2 * ni + half) * bn, bn)
                            plgpu.copy_gmem_to_smem(dy_gmem.at[rows, pl.ds(half_cols, bn)],
                                                    dy_smem.at[slot, half], dy_loaded.at[slot])

                    slot = _free_stage(x_consumed, x_count + offset + b, stages)
                    x_src = x_gmem.at[cols, rows] if interpret else x_gmem.at[rows, cols]
                    plgpu.copy_gmem_to_smem(x_src, x_smem.at[slot], x_loaded.at[slot])
                    return carry

                x_total, dy_total = plgpu.nd_loop(
                    (num_runs,), collective_axes="sm",
                    init_carry=(jnp.int32(0), jnp.int32(0)))(run_loads)
                _drain(x_consumed, x_total, stages)
                _drain(dy_consumed, dy_total, dy_stages)

            @pl.when(wg < 2)
            def _compute():
                plgpu.set_max_registers(232, action="increase")

                def release(x_position, dy_position, releases):
                    """A step's stages, its product finished: x's, and dy's where the tile
                    releases them."""
                    plgpu.barrier_arrive(x_consumed.at[x_position % stages])

                    @pl.when(releases)
                    def _():
                        plgpu.barrier_arrive(dy_consumed.at[dy_position % dy_stages])

                def step_product(acc_ref, segment, offset, loads, releases, x_count, dy_at,
                                 b, carry):
                    first_row, start, end, _ = segment
                    t = offset + b  # the step's place in the tile
                    plgpu.barrier_wait(x_loaded.at[(x_count + t) % stages])
                    dy_part = dy_smem.at[(dy_at + t) % dy_stages, wg]

                    @pl.when(loads)
                    def _():
                        plgpu.barrier_wait(dy_loaded.at[(dy_at + t) % dy_stages])
                        # The group's rows in this step: [lo, hi).
                        lo = start - first_row - b * br
                        hi = end - first_row - b * br

                        @pl.when((lo > 0) | (hi < br))
                        def _mask():
                            row = lax.broadcasted_iota(jnp.int32, (br, bn), 0)
                            if not interpret:
                                row = plgpu.layout_cast(row, plgpu.Layout.WGMMA)
                            keep = (row >= lo) & (row < hi)
                            dy_part[...] = dy_part[...] * keep.astype(dtype)
                            plgpu.commit_smem()

                    x_part = x_smem.at[(x_count + t) % stages]
                    lhs = x_part if interpret else plgpu.transpose_ref(x_part, (1, 0))
                    plgpu.wgmma(acc_ref, lhs, dy_part)
                    # The product before this one has finished: its stages can be reloaded.
                    plgpu.wgmma_wait(1)

                    @pl.when(t > 0)
                    def _():
                        release(x_count + t - 1, dy_at + t - 1, releases)

                    return carry

                def run_product(info, carry):
                    group, segments, steps, kept, k0, ni = run_of(info)

                    def tile_product(j, counts):
                        x_count, dy_count = counts
                        loads, releases, dy_at = positions(j, steps, kept, dy_count)

                        def multiply(acc_ref):
                            offset = 0
                            for segment in segments:
                                lax.fori_loop(0, segment[-1], functools.partial(
                                    step_product, acc_ref, segment, offset, loads, releases,
                                    x_count, dy_at), None)
                                offset = offset + segment[-1]
                            plgpu.wgmma_wait(0)

                            @pl.when(steps > 0)
                            def _():
                                release(x_count + steps - 1, dy_at + steps - 1, releases)

                            return acc_ref[...]

                        # Zero where the group is empty (no steps): the accumulator starts at zero.
                        acc = pl.run_scoped(multiply, plgpu.ACC((bm, bn))).astype(out_dtype)
                        _store_pieces(acc, out_smem.at[wg], lambda i, jj, j=j: out_gmem.at[
                            group, pl.ds(pl.multiple_of((k0 + j) * bm + i * em, 8), em),
                            pl.ds(pl.multiple_of((2 * ni + wg) * bn + jj * en, en), en)],
                            (em, en))
                        return x_count + steps, dy_at + steps

                    return lax.fori_loop(0, run_k, tile_product, carry)

                plgpu.nd_loop((num_runs,), collective_axes="sm",
                              init_carry=(jnp.int32(0), jnp.int32(0)))(run_product)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    return _persistent(body, jax.ShapeDtypeStruct((num_groups, depth, width), out_dtype),
                       interpret, name=SCOPES["dw"], warpgroups=3)(bounds, x_in, dy)
