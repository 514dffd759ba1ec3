"""FP8 quantization of token rows in one pass, Pallas Mosaic GPU (Hopper).

`quantize_rows(x)` is `jep.fp8.quantize_rows(x)` (the reference, jnp) as one kernel: e4m3 values
with a float32 scale per 1 x 128 tile, scale = max|tile| / 448 (1 for a tile of zeros), the
same values bit for bit. XLA's fusions of the reference read x twice (the max-abs, then the
division); here each [block_rows, 128] tile is read once: TMA brings it into shared memory
through a pipeline of `stages` steps, one warpgroup takes its rows' max-abs in registers,
scales and rounds it, and TMA stores the e4m3 tile. Each program (a block of rows' share of
its tiles, `column_splits`) keeps its scales in shared memory and stores them once, at its
end.

Built for DeepSeek-V3's FP8 recipe, where every expert product quantizes its rows first: on
Hopper `jep.experts.fp8_grouped_matmul` quantizes its rows with it, and FP8 dispatch packs the
kernel's rows and scales where `pack_rows(x)` does not take them: it stores the e4m3 tiles
straight into FP8 dispatch's packed rows, which saves the packing's own pass over them (30 us
against 45 on an H200 at 4096 x 7168; `jep.fp8.pack_rows` takes it where H is a multiple of
1024).

`quantize_columns(x, group_sizes)` is `jep.fp8.quantize_columns` as one kernel: a weight
gradient's operand quantized along its rows, a scale per 128 rows of one group x 1 channel,
stored transposed, each group from a tile of its own (`jep.experts` takes it for the FP8
weight gradient on Hopper).

`quantize_weight(w)` is `jep.fp8.quantize_weight(w)` as one kernel: each 128 x 128 block of a
bf16/f16 weight read once, its max-abs taken in registers, and the block stored in e4m3 in
both layouts, the second read out of shared memory transposed (Mosaic GPU's transposed
register layout). XLA's fusions of it read w twice, for the scales and then for both
layouts: on an H200, [256, 7168, 2048] bf16 took 4.2 ms against 9.5 (3.55 against 1.58
TB/s). `jep.experts` takes it for the FP8 products on Hopper.

The rows kernel divides each value by its scale, as the reference does, and has given XLA's
bytes exactly in every run so far. The weight and columns kernels take each scale's reciprocal
once and multiply: the product is within 3 float32 ulps of the quotient (the GPU's division,
PTX's div.full.f32, XLA's too, within 2), so a quotient that lies on an e4m3 tie may round to
either neighbour, and there the kernels and XLA's fusions may differ (the scales never do).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jep_kernels.grouped_matmul.dw_fp8 import padded_rows, tile_rows
from jep_kernels.grouped_matmul.mgpu import FP8_TILE as TILE, interpret_params, named, smem_transforms
from jep_kernels.vma import vary_like

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0


def kernel_takes(x, block_rows: int = 64) -> bool:
    """Whether the kernel takes x: [M, H], bf16/f16/f32, H a multiple of 128 and M of
    `block_rows` (each program's rows)."""
    return (x.ndim == 2 and x.dtype in (jnp.bfloat16, jnp.float16, jnp.float32)
            and x.shape[1] % TILE == 0 and x.shape[0] % block_rows == 0 and x.shape[0] > 0)


def column_splits(hidden: int) -> int:
    """Programs per block of rows by default: two 128-column tiles a program (one tile where
    their count is odd). On an H200 this was as fast as any split tried and 12-15% faster than one
    program per block of rows, at 4096 and 32768 rows of 7168 (many small programs keep every
    SM busy to the end)."""
    tiles = hidden // TILE
    return tiles // 2 if tiles % 2 == 0 else tiles


def quantize_rows(x, group_sizes=None, *, block_rows: int = 64, stages: int = 4,
                  splits: int | None = None, interpret: bool = False):
    """(q e4m3[M, H], scales f32[M, H / 128]): `jep.fp8.quantize_rows(x)`, bit for bit; with
    `group_sizes`, in the blocks of rows that hold some of the groups' rows only.

    Args:
      x: [M, H] bf16, f16 or f32; H a multiple of 128, M of `block_rows` (64: the rows of one
        program, a multiple of the 64 rows a warpgroup's register tiles hold).
      group_sizes: None, or i32[G], the rows of an expert-side buffer's groups (`jep.dispatch`'s
        recv_x and what the experts make of it). The blocks of rows past their sum are left
        unwritten, in q and in the scales: no grouped product stores a row past the groups.
        Under EP=n a dropless buffer holds n times the rows an even spread fills, so this
        skips most of the pass there.
      stages: tiles in flight per program.
      splits: programs per block of rows, each taking H / 128 / splits of its tiles (a divisor
        of H / 128); by default `column_splits`.
      interpret: Pallas's GPU interpret mode (CPU, for tests).
    """
    if group_sizes is not None and group_sizes.ndim != 1:
        raise ValueError(f"group_sizes must be [G], got shape {group_sizes.shape}")
    end = None if group_sizes is None else jnp.sum(group_sizes, dtype=jnp.int32)[None]
    return _quantize_rows(x, x.shape[1], block_rows=block_rows, stages=stages, splits=splits,
                          interpret=interpret, end=end)


def pack_kernel_takes(x, block_rows: int = 64) -> bool:
    """Whether `pack_rows` takes x: as `kernel_takes`, and H a multiple of 1024, so that a
    packed row (H + H / 32 bytes) is a whole number of the 32 bytes of the narrowest swizzled
    tile TMA stores from."""
    return kernel_takes(x, block_rows) and x.shape[1] % 1024 == 0


TAILS = ("kernel", "xla")  # who writes the scales' bytes into the packed rows' tails


def pack_rows(x, *, block_rows: int = 64, stages: int = 4, splits: int | None = None,
              tails: str = "xla", interpret: bool = False):
    """u32[M, (H + H / 32) / 4]: `jep.fp8.pack_rows(x)`, the same words, without a pass of its
    own for the packing: the kernel stores each e4m3 tile straight into its place in the
    packed rows (a [M, H + H / 32] byte buffer), and the scales' bytes go into the rows' tails
    (4 bytes in 132 of each row): `tails` "xla", by XLA in place after the kernel (a kernel of
    its own: 30.1 us for both at 4096 x 7168 on an H200, against 23.2 for the rows kernel
    alone); "kernel", by the kernel from registers, a byte at a time, as TMA cannot store
    boxes of fewer than 16 bytes a row (not yet timed). Arguments as `quantize_rows`; H a
    multiple of 1024 (`pack_kernel_takes`)."""
    if not pack_kernel_takes(x, block_rows):
        raise ValueError(f"x must be [M, H] bf16/f16/f32 with H a multiple of 1024 and M of "
                         f"block_rows={block_rows}, got {x.dtype}{list(x.shape)}")
    if tails not in TAILS:
        raise ValueError(f"tails must be one of {TAILS}, got {tails!r}")
    num_rows, hidden = x.shape
    width = hidden + 4 * (hidden // TILE)
    if tails == "kernel":
        rows = _quantize_rows(x, width, block_rows=block_rows, stages=stages, splits=splits,
                              interpret=interpret, tails=True)
    else:
        rows, scales = _quantize_rows(x, width, block_rows=block_rows, stages=stages,
                                      splits=splits, interpret=interpret)
        tail_bytes = lax.bitcast_convert_type(scales, E4M3).reshape(num_rows, width - hidden)
        rows = lax.dynamic_update_slice(rows, tail_bytes, (0, hidden))
    return lax.bitcast_convert_type(rows.reshape(num_rows, width // 4, 4), jnp.uint32)


def _quantize_rows(x, width: int, *, block_rows: int, stages: int, splits: int | None,
                   interpret: bool, tails: bool = False, end=None):
    """`quantize_rows`, q stored as the first H columns of an e4m3[M, width] array (the rest
    left unwritten); with `tails`, each row's scales' bytes stored after its H columns
    (`jep.fp8.pack`'s layout), and q alone returned. With `end` (i32[1]), the blocks of rows
    from row end[0] on are left unwritten."""
    if not kernel_takes(x, block_rows) or block_rows % 64 or stages < 1:
        raise ValueError(f"x must be [M, H] bf16/f16/f32 with H a multiple of {TILE} and M of "
                         f"block_rows={block_rows} (a multiple of 64; stages={stages} >= 1), "
                         f"got {x.dtype}{list(x.shape)}")
    num_rows, hidden = x.shape
    tiles = hidden // TILE
    splits = column_splits(hidden) if splits is None else splits
    if splits < 1 or tiles % splits:
        raise ValueError(f"splits must divide the {tiles} tiles of 128 columns, got {splits}")
    own = tiles // splits  # the tiles of one program
    # The e4m3 tiles' layout in shared memory: TMA stores them into rows of `width` bytes, of
    # which its tiling must be a divisor (the widest swizzle that is; 128 where width = H).
    swizzle = next(size for size in (128, 64, 32) if width % size == 0)
    q_transforms = () if interpret else (plgpu.TilingTransform((8, swizzle)),
                                         plgpu.SwizzleTransform(swizzle))
    # Register layouts (the interpreter has none).
    laid_out = (lambda value, _: value) if interpret else plgpu.layout_cast

    def body(*refs):
        end_gmem, refs = (refs[0], refs[1:]) if end is not None else (None, refs)
        x_gmem, q_gmem, *refs = refs
        scales_gmem, q_smem, scales_smem = (None, *refs, None) if tails else refs
        start = lax.axis_index("rows") * block_rows
        rows = pl.ds(start, block_rows)
        first = lax.axis_index("columns") * own

        def store_tail(tile, scale):
            """The tile's scales' bytes into its rows' tails, a byte at a time from registers
            (a program's 4 x `own` bytes a row are narrower than the 16 bytes a row of a TMA
            store's box takes at least)."""
            word = lax.bitcast_convert_type(scale, jnp.uint32)
            column = hidden + 4 * (first + tile)
            for j in range(4):
                byte = ((word >> (8 * j)) & 0xFF).astype(jnp.uint8)  # little-endian
                q_gmem.at[rows, column + j][...] = lax.bitcast_convert_type(byte, E4M3)

        def step(indices, x_smem):
            tile = indices[0]
            slot = tile % 2
            values = laid_out(x_smem[...], plgpu.Layout.WGMMA).astype(jnp.float32)
            amax = jnp.max(jnp.abs(values), axis=1)
            scale = jnp.where(amax == 0, 1.0, amax / E4M3_MAX)
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the store from this slot is done
            q_smem[slot] = (values / lax.broadcast_in_dim(scale, values.shape, [0])).astype(E4M3)
            if tails:
                store_tail(tile, scale)
            else:
                scales_smem[tile] = scale
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem.at[slot],
                                    q_gmem.at[rows, pl.ds((first + tile) * TILE, TILE)])

        def block():
            plgpu.emit_pipeline(step, grid=(own,),
                                in_specs=[plgpu.BlockSpec((block_rows, TILE),
                                                          lambda t: (0, first + t))],
                                max_concurrent_steps=stages)(x_gmem.at[rows])
            if not tails:
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(scales_smem, scales_gmem.at[pl.ds(first, own), rows])
            plgpu.wait_smem_to_gmem(0)

        if end_gmem is None:
            block()
        else:  # a block of rows past the groups: nothing to load or store
            pl.when(start < end_gmem[0])(block)

    q_type = jax.ShapeDtypeStruct((num_rows, width), E4M3)
    q_smem = plgpu.SMEM((2, block_rows, TILE), E4M3, transforms=q_transforms)
    outs = plgpu.kernel(
        named(body, "jep_fp8_quantize"),
        out_type=q_type if tails else (
            q_type, jax.ShapeDtypeStruct((tiles, num_rows), jnp.float32)),
        grid=(num_rows // block_rows, splits),
        grid_names=("rows", "columns"),
        scratch_types=[q_smem] if tails else [
            q_smem, plgpu.SMEM((own, block_rows), jnp.float32)],
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret_params() if interpret else None,
    )(*(() if end is None else (end,)), x)
    if tails:
        return vary_like(outs, x)
    q, scales_t = outs
    return vary_like(q, x), vary_like(scales_t.T, x)


def weight_kernel_takes(w) -> bool:
    """Whether `quantize_weight` takes w: [G, K, N] bf16/f16 (read exactly by the transposed
    loads), K and N multiples of 128, G at least 1."""
    return (w.ndim == 3 and w.dtype in (jnp.bfloat16, jnp.float16) and w.shape[0] > 0
            and w.shape[1] > 0 and w.shape[1] % TILE == 0 and w.shape[2] > 0
            and w.shape[2] % TILE == 0)


def quantize_weight(w, *, stages: int = 4, buffers: int = 2, interpret: bool = False):
    """(q e4m3[G, K, N], scales f32[G, K / 128, N / 128], q_t e4m3[G, N, K], scales_t
    f32[G, N / 128, K / 128]): `jep.fp8.quantize_weight(w)` (the same scales; the same q but
    where the product by the scale's reciprocal rounds a quotient at an e4m3 tie the other
    way), q_t exactly q transposed.

    Each program takes one band of 128 rows of one group's weight and walks its blocks of 128
    columns through a pipeline of `stages` TMA loads; a block's scale is its max-abs over 448
    (1 for a block of zeros), and its two layouts and its scale are stored from one of
    `buffers` slots.

    Args:
      w: [G, K, N] bf16 or f16, K and N multiples of 128.
      stages: blocks in flight per program (on an H200, [256, 7168, 2048] bf16 in 4.00 ms with
        4, 4.13 with 3, 4.37 with 2; jax 0.11.2, 2026-12-05).
      buffers: slots of the stores, 1 or 2 (2: a block's stores run while the next block is
        computed; 1: they are awaited first, and a program takes 32 KB less shared memory:
        with 2 stages about 97 KB, two programs a multiprocessor; 4.11 ms with 2 or 3
        stages).
      interpret: Pallas's GPU interpret mode (CPU, for tests).
    """
    if not weight_kernel_takes(w) or stages < 1 or buffers not in (1, 2):
        raise ValueError(f"w must be [G, K, N] bf16/f16 with K and N multiples of {TILE} "
                         f"(stages={stages} >= 1, buffers={buffers} 1 or 2), got "
                         f"{w.dtype}{list(w.shape)}")
    groups, depth, width = w.shape
    row_blocks, col_blocks = depth // TILE, width // TILE
    half = TILE // 2  # the rows of one warpgroup register tile

    def rows_of(w_smem, h):
        """Rows h * 64 .. of the block, f32 [64, 128]."""
        if interpret:  # no register layouts
            return w_smem[pl.ds(h * half, half)].astype(jnp.float32)
        return plgpu.load(w_smem.at[pl.ds(h * half, half)], (),
                          layout=plgpu.Layout.WGMMA).astype(jnp.float32)

    def columns_of(w_smem, h):
        """Columns h * 64 .. of the block as rows, f32 [64, 128]: read out of shared memory
        transposed, then moved to the layout `rows_of` gives."""
        if interpret:  # no transposed views
            return w_smem[:, pl.ds(h * half, half)].T.astype(jnp.float32)
        read = plgpu.load(plgpu.transpose_ref(w_smem.at[:, pl.ds(h * half, half)], (1, 0)), (),
                          layout=plgpu.Layout.WGMMA_TRANSPOSED)
        # Moved in w's 16 bits (a shuffle and a byte permute a register), then widened.
        return plgpu.layout_cast(read, plgpu.Layout.WGMMA).astype(jnp.float32)

    def body(w_gmem, q_gmem, q_t_gmem, scales_gmem, q_smem, q_t_smem, scales_smem):
        group, band = lax.axis_index("groups"), lax.axis_index("rows")
        rows = pl.ds(band * TILE, TILE)

        def step(indices, w_smem):
            block = indices[0]
            slot = block % buffers
            parts = [rows_of(w_smem, h) for h in range(2)]
            # The block's max-abs: each row's, then theirs (Mosaic GPU reduces one axis at a
            # time).
            amax = jnp.max(jnp.maximum(jnp.max(jnp.abs(parts[0]), axis=1),
                                       jnp.max(jnp.abs(parts[1]), axis=1)), axis=0)
            scale = jnp.where(amax == 0, 1.0, amax / E4M3_MAX)
            # This slot's stores (a commit group a block) are done with it.
            plgpu.wait_smem_to_gmem(buffers - 1, wait_read_only=True)
            inverse = 1.0 / scale  # one division a block, then a product an element
            for h in range(2):
                q_smem[slot, pl.ds(h * half, half)] = (parts[h] * inverse).astype(E4M3)
            for h in range(2):  # read after the rows are stored: fewer registers live
                q_t_smem[slot, pl.ds(h * half, half)] = (
                    columns_of(w_smem, h) * inverse).astype(E4M3)
            scales_smem[slot] = jnp.full((TILE,), scale, jnp.float32)
            plgpu.commit_smem()
            columns = pl.ds(block * TILE, TILE)
            plgpu.copy_smem_to_gmem(q_smem.at[slot], q_gmem.at[group, rows, columns],
                                    commit_group=False)
            plgpu.copy_smem_to_gmem(scales_smem.at[slot], scales_gmem.at[group, band, block],
                                    commit_group=False)
            plgpu.copy_smem_to_gmem(q_t_smem.at[slot], q_t_gmem.at[group, columns, rows])

        plgpu.emit_pipeline(
            step, grid=(col_blocks,),
            in_specs=[plgpu.BlockSpec((TILE, TILE), lambda t: (0, t),
                                      transforms=() if interpret
                                      else smem_transforms(TILE, w.dtype))],
            max_concurrent_steps=stages)(w_gmem.at[group, rows])
        plgpu.wait_smem_to_gmem(0)

    # Each scale is stored as a row of 128 copies (a register vector; 1/128 of the bytes).
    q, q_t, spread = plgpu.kernel(
        named(body, "jep_fp8_quantize_weight"),
        out_type=(jax.ShapeDtypeStruct((groups, depth, width), E4M3),
                  jax.ShapeDtypeStruct((groups, width, depth), E4M3),
                  jax.ShapeDtypeStruct((groups, row_blocks, col_blocks, TILE), jnp.float32)),
        grid=(groups, row_blocks),
        grid_names=("groups", "rows"),
        scratch_types=[plgpu.SMEM((buffers, TILE, TILE), E4M3),
                       plgpu.SMEM((buffers, TILE, TILE), E4M3),
                       plgpu.SMEM((buffers, TILE), jnp.float32)],
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret_params() if interpret else None,
    )(w)
    scales = spread[..., 0]
    return (vary_like(q, w), vary_like(scales, w), vary_like(q_t, w),
            vary_like(jnp.swapaxes(scales, 1, 2), w))


def columns_kernel_takes(x) -> bool:
    """Whether `quantize_columns` takes x: [M, H] bf16/f16 (read exactly by the transposed
    loads), H a multiple of 128, M of 8 (the rows of a TMA tile), M at least 1."""
    return (x.ndim == 2 and x.dtype in (jnp.bfloat16, jnp.float16) and x.shape[0] > 0
            and x.shape[0] % 8 == 0 and x.shape[1] > 0 and x.shape[1] % TILE == 0)


def quantize_columns(x, group_sizes, *, channels: int = 64, stages: int = 2,
                     splits: int | None = None, interpret: bool = False):
    """(q_t e4m3[H, P], scales f32[P / 128, H]): `jep.fp8.quantize_columns(x, group_sizes)`, a
    weight gradient's operand quantized along its rows (a scale per 128 rows of one group x 1
    channel), transposed, each group from a tile of its own (P = `padded_rows`).

    A program takes one tile of the padded layout (128 rows of one group, the rest zeros) and
    H / splits of its channels in blocks of `channels`, through a pipeline of `stages` TMA loads:
    a group's rows start anywhere, and TMA loads a swizzled tile from row offsets in multiples
    of 8 only, so each block comes in plain, its rows past the group are zeroed in registers,
    it goes back to shared memory swizzled, and is read out transposed (as `quantize_weight`
    reads its q_t); each channel's max-abs over the tile's rows gives its scale, and the e4m3
    block is stored into q_t. The tiles after the last group's (zeros with scale 1 in the
    reference) are left unwritten: neither the FP8 weight gradient nor `dequantize_columns`
    takes a value from them, and under EP=n a dropless buffer's layout holds about n times
    the tiles an even spread fills.

    Args:
      x: [M, H] bf16 or f16, H a multiple of 128, M of 8 (`columns_kernel_takes`).
      group_sizes: i32[G], rows per group; rows past their sum are left out.
      channels: the channels of a block, 64 or 128 (on an H200 a program of 128-channel blocks
        takes about 130 KB of shared memory, one a multiprocessor; of 64, two: 0.44 ms against
        0.64 at 32768 x 7168 in 256 groups, jax 0.11.2, 2026-12-05).
      stages: blocks in flight per program.
      splits: programs per tile, each taking H / splits of its channels (a divisor of
        H / 128); by default `column_splits`.
      interpret: Pallas's GPU interpret mode (CPU, for tests).
    """
    if not columns_kernel_takes(x) or stages < 1 or channels not in (64, 128):
        raise ValueError(f"x must be [M, H] bf16/f16 with H a multiple of {TILE} and M of 8 "
                         f"(stages={stages} >= 1, channels={channels} 64 or 128), got "
                         f"{x.dtype}{list(x.shape)}")
    if group_sizes.ndim != 1:
        raise ValueError(f"group_sizes must be [G], got shape {group_sizes.shape}")
    num_rows, hidden = x.shape
    splits = column_splits(hidden) if splits is None else splits
    if splits < 1 or (hidden // TILE) % splits:
        raise ValueError(f"splits must divide the {hidden // TILE} blocks of 128 channels, got "
                         f"{splits}")
    blocks = hidden // channels
    own = blocks // splits  # the blocks of one program
    padded = padded_rows(num_rows, group_sizes.shape[0])
    tiles = padded // TILE
    # Each tile's first row of x (0 where it holds none) and its rows of the group: i32[2 P / 128].
    row, held = tile_rows(group_sizes, num_rows)
    table = jnp.stack([jnp.where(held > 0, row, 0), held], axis=1).reshape(-1)
    half = TILE // 2  # the rows of one warpgroup register tile
    laid_out = (lambda value, _: value) if interpret else plgpu.layout_cast

    def rows_of(x_smem, h, held):
        """Rows h * 64 .. of the block, f32 [64, channels], those past the group's `held`
        zeroed."""
        values = laid_out(x_smem[pl.ds(h * half, half), pl.ds(0, channels)],
                          plgpu.Layout.WGMMA).astype(jnp.float32)
        index = laid_out(lax.broadcasted_iota(jnp.int32, (half, channels), 0),
                         plgpu.Layout.WGMMA)
        return jnp.where(index + h * half < held, values, 0.0)

    def columns_of(t_smem, h):
        """Channels h * 64 .. of the block as rows, f32 [64, 128] (as `quantize_weight`)."""
        if interpret:
            return t_smem[:, pl.ds(h * half, half)].T.astype(jnp.float32)
        read = plgpu.load(plgpu.transpose_ref(t_smem.at[:, pl.ds(h * half, half)], (1, 0)), (),
                          layout=plgpu.Layout.WGMMA_TRANSPOSED)
        return plgpu.layout_cast(read, plgpu.Layout.WGMMA).astype(jnp.float32)

    def body(table_gmem, x_gmem, q_gmem, scales_gmem, t_smem, q_smem, scales_smem):
        index = lax.axis_index("tiles")
        base = lax.axis_index("columns") * own
        held = table_gmem[2 * index + 1]

        def step(indices, x_smem):
            block = indices[0]
            slot = block % 2
            for h in range(2):
                t_smem[pl.ds(h * half, half)] = rows_of(x_smem, h, held).astype(x.dtype)
            plgpu.commit_smem()
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # this slot's store is done
            for h in range(channels // half):
                values = columns_of(t_smem, h)
                amax = jnp.max(jnp.abs(values), axis=1)
                scale = jnp.where(amax == 0, 1.0, amax / E4M3_MAX)
                inverse = 1.0 / scale  # a division a channel, then a product an element
                q_smem[slot, pl.ds(h * half, half)] = (
                    values * lax.broadcast_in_dim(inverse, values.shape, [0])).astype(E4M3)
                scales_smem[block, pl.ds(h * half, half)] = scale
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem.at[slot],
                                    q_gmem.at[pl.ds((base + block) * channels, channels),
                                              pl.ds(index * TILE, TILE)])

        @pl.when(held > 0)  # a tile past the last group's: nothing to load or store
        def _():
            plgpu.emit_pipeline(step, grid=(own,),
                                in_specs=[plgpu.BlockSpec((TILE, channels),
                                                          lambda b: (0, base + b))],
                                max_concurrent_steps=stages)(
                x_gmem.at[pl.ds(table_gmem[2 * index], TILE)])
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(scales_smem, scales_gmem.at[index, pl.ds(base, own)])
            plgpu.wait_smem_to_gmem(0)

    # The interpreter reads past x's end as zeros only within the array: pad a tile of rows.
    x_in = jnp.pad(x, ((0, TILE), (0, 0))) if interpret else x
    q_t, scales = plgpu.kernel(
        named(body, "jep_fp8_quantize_columns"),
        out_type=(jax.ShapeDtypeStruct((hidden, padded), E4M3),
                  jax.ShapeDtypeStruct((tiles, blocks, channels), jnp.float32)),
        grid=(tiles, splits),
        grid_names=("tiles", "columns"),
        scratch_types=[plgpu.SMEM((TILE, channels), x.dtype, transforms=() if interpret
                                  else smem_transforms(channels, x.dtype)),
                       plgpu.SMEM((2, channels, TILE), E4M3),
                       plgpu.SMEM((own, channels), jnp.float32)],
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret_params() if interpret else None,
    )(table, x_in)
    return vary_like(q_t, x), vary_like(scales.reshape(tiles, hidden), x)
