"""The training example with its expert weight gradients taken from FP8 operands too (issue 21:
"dw in FP8 or bf16, whichever meets the accuracy bar"), emulated: x and dy rounded to e4m3 with
a float32 scale per 128 rows of one group x 1 column (DeepSeek-V3's tiles for the weight
gradient, whose contraction runs over the rows), then dw = x'^T dy' in float32. jep itself takes
dw straight from x and dy in their dtype; this script swaps that rule of
`jep.experts.fp8_grouped_matmul`'s backward for the run.

    python benchmarks/scripts/fp8_wgrad_accuracy.py --fp8 --out out/fp8_wgrad   # then the
    python examples/train_moe_lm.py --fp8 --out out/fp8                         # two to compare
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
from jax import lax

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

import jep.experts  # noqa: E402
from jep import fp8  # noqa: E402
import train_moe_lm  # noqa: E402

TILE = 128


def round_through_e4m3(a, group_sizes):
    """a [M, C] in float32, each (128 rows of one group, column) tile rounded through e4m3 with
    its max-abs / 448 as scale; rows past the last group zero."""
    num_rows, num_groups = a.shape[0], group_sizes.shape[0]
    ends = jnp.cumsum(group_sizes)
    group = jnp.searchsorted(ends, jnp.arange(num_rows), side="right")
    inside = group < num_groups
    group = jnp.minimum(group, num_groups - 1)
    tiles = -(-group_sizes // TILE)
    first_tile = jnp.cumsum(tiles) - tiles
    num_segments = num_rows // TILE + num_groups + 1  # the last one for the rows outside
    segment = jnp.where(inside, first_tile[group] + (jnp.arange(num_rows) - (ends - group_sizes)[group]) // TILE,
                        num_segments - 1)
    a32 = a.astype(jnp.float32)
    amax = jax.ops.segment_max(jnp.abs(a32), segment, num_segments=num_segments)
    scale = jnp.where(amax > 0, amax / fp8.E4M3_MAX, 1.0)[segment]
    rounded = lax.optimization_barrier((a32 / scale).astype(fp8.E4M3)).astype(jnp.float32)
    return jnp.where(inside[:, None], rounded * scale, 0.0)


def fp8_weight_gradient_bwd(backend, residuals, dy):
    """`jep.experts._fp8_product_bwd` with dw from the e4m3-rounded x and dy."""
    x, w, quantized, group_sizes = residuals
    dy = dy.astype(x.dtype)
    dx = jep.experts._fp8_times(dy, quantized.q, quantized.scales, group_sizes, backend)
    x8, dy8 = round_through_e4m3(x, group_sizes), round_through_e4m3(dy, group_sizes)
    _, pullback = jax.vjp(lambda w: lax.ragged_dot(x8, w, group_sizes,
                                                   precision=lax.Precision.HIGHEST),
                          w.astype(jnp.float32))
    return dx, pullback(dy8)[0].astype(w.dtype), None, None


if __name__ == "__main__":
    jep.experts._fp8_product.defvjp(jep.experts._fp8_product_fwd, fp8_weight_gradient_bwd)
    train_moe_lm.main(sys.argv[1:])
