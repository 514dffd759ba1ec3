"""FP8 quantization of token rows in one pass, Pallas Mosaic GPU (Hopper).

`quantize_rows(x)` is `jep.fp8.quantize_rows(x)` (the reference, jnp) as one kernel: e4m3 values
with a float32 scale per 1 x 128 tile, scale = max|tile| / 448 (1 for a tile of zeros), the
same values bit for bit. XLA's fusions of the reference read x twice (the max-abs, then the
division); here each [block_rows, 128] tile is read once: TMA brings it into shared memory
through a pipeline of `stages` steps, one warpgroup takes its rows' max-abs in registers,
scales and rounds it, and TMA stores the e4m3 tile. Each program (a block of rows' share of
its tiles, `column_splits`) keeps its scales in shared memory and stores them once, at its
end.

Built for DeepSeek-V3's FP8 recipe, where every expert product quantizes its rows first:
`jep.experts.fp8_grouped_matmul` calls it on Hopper. FP8 dispatch still packs its rows with
XLA's fusions (`jep.fp8.pack_rows`, the quantize and the packing in one program).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jep_kernels.grouped_matmul.mgpu import FP8_TILE as TILE, interpret_params, named
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


def quantize_rows(x, *, block_rows: int = 64, stages: int = 4, splits: int | None = None,
                  interpret: bool = False):
    """(q e4m3[M, H], scales f32[M, H / 128]): `jep.fp8.quantize_rows(x)`, bit for bit.

    Args:
      x: [M, H] bf16, f16 or f32; H a multiple of 128, M of `block_rows` (64: the rows of one
        program, a multiple of the 64 rows a warpgroup's register tiles hold).
      stages: tiles in flight per program.
      splits: programs per block of rows, each taking H / 128 / splits of its tiles (a divisor
        of H / 128); by default `column_splits`.
      interpret: Pallas's GPU interpret mode (CPU, for tests).
    """
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
    # Register layouts (the interpreter has none).
    laid_out = (lambda value, _: value) if interpret else plgpu.layout_cast

    def body(x_gmem, q_gmem, scales_gmem, q_smem, scales_smem):
        rows = pl.ds(lax.axis_index("rows") * block_rows, block_rows)
        first = lax.axis_index("columns") * own

        def step(indices, x_smem):
            tile = indices[0]
            slot = tile % 2
            values = laid_out(x_smem[...], plgpu.Layout.WGMMA).astype(jnp.float32)
            amax = jnp.max(jnp.abs(values), axis=1)
            scale = jnp.where(amax == 0, 1.0, amax / E4M3_MAX)
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the store from this slot is done
            q_smem[slot] = (values / lax.broadcast_in_dim(scale, values.shape, [0])).astype(E4M3)
            scales_smem[tile] = scale
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem.at[slot],
                                    q_gmem.at[rows, pl.ds((first + tile) * TILE, TILE)])

        plgpu.emit_pipeline(step, grid=(own,),
                            in_specs=[plgpu.BlockSpec((block_rows, TILE),
                                                      lambda t: (0, first + t))],
                            max_concurrent_steps=stages)(x_gmem.at[rows])
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(scales_smem, scales_gmem.at[pl.ds(first, own), rows])
        plgpu.wait_smem_to_gmem(0)

    q, scales_t = plgpu.kernel(
        named(body, "jep_fp8_quantize"),
        out_type=(jax.ShapeDtypeStruct((num_rows, hidden), E4M3),
                  jax.ShapeDtypeStruct((tiles, num_rows), jnp.float32)),
        grid=(num_rows // block_rows, splits),
        grid_names=("rows", "columns"),
        scratch_types=[plgpu.SMEM((2, block_rows, TILE), E4M3),
                       plgpu.SMEM((own, block_rows), jnp.float32)],
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret_params() if interpret else None,
    )(x)
    return vary_like(q, x), vary_like(scales_t.T, x)
