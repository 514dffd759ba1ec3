"""FP8 quantization of token rows in one pass, Pallas Mosaic GPU (Hopper).

`quantize_rows(x)` is `jep.fp8.quantize_rows(x)` (the reference, jnp) as one kernel: e4m3 values
with a float32 scale per 1 x 128 tile, scale = max|tile| / 448 (1 for a tile of zeros), the
same values bit for bit. XLA's fusions of the reference read x twice (the max-abs, then the
division); here each [block_rows, 128] tile is read once: TMA brings it into shared memory
through a pipeline of `stages` steps, one warpgroup takes its rows' max-abs in registers,
scales and rounds it, and TMA stores the e4m3 tile. Each program (a block of rows) keeps its
scales in shared memory and stores them once, at its end.

Built for DeepSeek-V3's FP8 recipe, where every expert product and every FP8 dispatch quantizes
its rows first (`jep.experts.fp8_grouped_matmul`, `DispatchConfig(fp8=True)`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jep_kernels.grouped_matmul.mgpu import FP8_TILE as TILE, interpret_params, named

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0


def kernel_takes(x, block_rows: int = 64) -> bool:
    """Whether the kernel takes x: [M, H], bf16/f16/f32, H a multiple of 128 and M of
    `block_rows` (each program's rows)."""
    return (x.ndim == 2 and x.dtype in (jnp.bfloat16, jnp.float16, jnp.float32)
            and x.shape[1] % TILE == 0 and x.shape[0] % block_rows == 0 and x.shape[0] > 0)


def quantize_rows(x, *, block_rows: int = 64, stages: int = 4, interpret: bool = False):
    """(q e4m3[M, H], scales f32[M, H / 128]): `jep.fp8.quantize_rows(x)`, bit for bit.

    Args:
      x: [M, H] bf16, f16 or f32; H a multiple of 128, M of `block_rows` (64: the rows of one
        program, a multiple of the 64 rows a warpgroup's register tiles hold).
      stages: tiles in flight per program.
      interpret: Pallas's GPU interpret mode (CPU, for tests).
    """
    if not kernel_takes(x, block_rows) or block_rows % 64 or stages < 1:
        raise ValueError(f"x must be [M, H] bf16/f16/f32 with H a multiple of {TILE} and M of "
                         f"block_rows={block_rows} (a multiple of 64; stages={stages} >= 1), "
                         f"got {x.dtype}{list(x.shape)}")
    num_rows, hidden = x.shape
    tiles = hidden // TILE
    # Register layouts (the interpreter has none).
    laid_out = (lambda value, _: value) if interpret else plgpu.layout_cast

    def body(x_gmem, q_gmem, scales_gmem, q_smem, scales_smem):
        rows = pl.ds(lax.axis_index("rows") * block_rows, block_rows)

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
            plgpu.copy_smem_to_gmem(q_smem.at[slot], q_gmem.at[rows, pl.ds(tile * TILE, TILE)])

        plgpu.emit_pipeline(step, grid=(tiles,),
                            in_specs=[plgpu.BlockSpec((block_rows, TILE), lambda t: (0, t))],
                            max_concurrent_steps=stages)(x_gmem.at[rows])
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(scales_smem, scales_gmem.at[:, rows])
        plgpu.wait_smem_to_gmem(0)

    q, scales_t = plgpu.kernel(
        named(body, "jep_fp8_quantize"),
        out_type=(jax.ShapeDtypeStruct((num_rows, hidden), E4M3),
                  jax.ShapeDtypeStruct((tiles, num_rows), jnp.float32)),
        grid=(num_rows // block_rows,),
        grid_names=("rows",),
        scratch_types=[plgpu.SMEM((2, block_rows, TILE), E4M3),
                       plgpu.SMEM((tiles, block_rows), jnp.float32)],
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret_params() if interpret else None,
    )(x)
    return q, scales_t.T
