"""jep.fp8: DeepSeek-V3's tile-wise e4m3 quantization, against float64 and e4m3's error bound."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jep.platform
from jep import fp8


def tile_scales(scales, shape, rows_block, cols_block):
    """Each element's scale, [..., R, C], from per-tile scales."""
    full = np.repeat(np.repeat(np.asarray(scales, np.float64), rows_block, -2), cols_block, -1)
    return full[..., :shape[-2], :shape[-1]]


def assert_within_e4m3(x, back, scale):
    """|x - back| <= max(|x| / 16, scale * 2^-10): half an e4m3 ulp, or half its smallest
    subnormal, times the scale."""
    x, back = np.asarray(x, np.float64), np.asarray(back, np.float64)
    bound = np.maximum(np.abs(x) / 16, scale * 2.0**-10)
    assert np.all(np.abs(x - back) <= bound * (1 + 1e-6)), np.max(np.abs(x - back) / bound)


def assert_rounded_from(q, quotient, ulps: int = 2):
    """q (e4m3) is e4m3(quotient) rounded to nearest even, or where quotient lies within `ulps`
    float32 ulps of a rounding boundary, either neighbour: GPU code divides with PTX's
    div.full.f32 (XLA's and Mosaic GPU's f32 division, within 2 ulps), and the weight and
    columns kernels multiply by the scale's reciprocal (within 3: the reciprocal's 2, the
    product's rounding), so a quotient at an e4m3 tie may land on either side of it.
    `quotient` is float64."""
    q = np.asarray(q.astype(jnp.float32), np.float64)
    give = np.abs(quotient) * ulps * 2.0**-23
    below, above = ((quotient + d).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
                    for d in (-give, give))
    assert np.all((q == below) | (q == above)), np.argwhere((q != below) & (q != above))[:5]
    exact = below == above
    assert exact.mean() > 0.99  # the window is taken at ties only


def magnitudes(rng, shape):
    """Normal values times a scale per row spanning 1e-3 .. 1e3, with some exact zeros."""
    x = rng.normal(size=shape) * 10.0 ** rng.uniform(-3, 3, size=shape[:-1] + (1,))
    x[rng.random(shape) < 0.05] = 0
    return x


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("power_of_two", [False, True])
def test_rows_round_trip_within_the_e4m3_bound(rng, dtype, power_of_two):
    x = jnp.asarray(magnitudes(rng, (3, 5, 384)), dtype)
    q, scales = fp8.quantize_rows(x, power_of_two_scales=power_of_two)
    assert q.dtype == jnp.float8_e4m3fn and q.shape == x.shape
    assert scales.dtype == jnp.float32 and scales.shape == (3, 5, 3)
    back = fp8.dequantize_rows(q, scales, jnp.float32)
    scale = tile_scales(scales[..., None, :], (1, 384), 1, 128)[..., 0, :]
    assert_within_e4m3(x.astype(jnp.float32), back, scale)
    # Dequantizing is q * scale in float32, exactly as float64 computes it, then rounded.
    want = np.asarray(q, np.float64) * scale
    np.testing.assert_array_equal(np.asarray(back), want.astype(np.float32))
    amax = np.abs(np.asarray(q, np.float32)).reshape(3, 5, 3, 128).max(-1)
    if power_of_two:  # exact powers of two; the largest entry lands in [224, 448] (rounded)
        assert np.all(np.log2(scales) == np.round(np.log2(scales)))
        assert np.all((amax >= 224) & (amax <= 448))
    else:  # each tile's largest entry maps to +-448 exactly
        assert np.all(amax == 448)


@pytest.mark.parametrize("shape", [(256, 384), (2, 200, 300), (129, 1)])
def test_blocks_round_trip_with_partial_blocks(rng, shape):
    w = jnp.asarray(magnitudes(rng, shape), jnp.float32)
    q, scales = fp8.quantize_blocks(w)
    grid = fp8.block_grid(shape)
    assert q.shape == shape and scales.shape == shape[:-2] + grid
    back = fp8.dequantize_blocks(q, scales, jnp.float32)
    scale = tile_scales(scales, shape, 128, 128)
    assert_within_e4m3(w, back, scale)
    np.testing.assert_array_equal(np.asarray(back),
                                  (np.asarray(q, np.float64) * scale).astype(np.float32))
    # Each block's scale is its own max-abs over 448.
    w64 = np.asarray(w, np.float64)
    for i in range(grid[0]):
        for j in range(grid[1]):
            block = w64[..., 128 * i:128 * (i + 1), 128 * j:128 * (j + 1)]
            amax = np.abs(block).max(axis=(-2, -1))
            want = np.where(amax == 0, 1, amax / 448).astype(np.float32)
            # (float32 division: XLA may multiply by 1/448, an ulp apart)
            np.testing.assert_allclose(np.asarray(scales)[..., i, j], want, rtol=2.5e-7)


@pytest.mark.parametrize("shape, dtype", [((3, 256, 384), jnp.bfloat16),
                                          ((2, 128, 256), jnp.float32),
                                          ((2, 200, 130), jnp.bfloat16)])  # partial blocks
def test_weight_in_both_layouts_is_the_blocks_and_their_transpose(rng, shape, dtype):
    """quantize_weight: quantize_blocks and its transpose bit for bit, eagerly and under jit,
    a block of zeros and values down to e4m3's subnormals included."""
    w = jnp.asarray(magnitudes(rng, shape), dtype).at[0, :128, :128].set(0)
    q, scales = fp8.quantize_blocks(w)
    want = (q, scales, jnp.swapaxes(q, 1, 2), jnp.swapaxes(scales, 1, 2))
    for quantize in (fp8.quantize_weight, jax.jit(fp8.quantize_weight)):
        for got, expected in zip(quantize(w), want):
            assert got.shape == expected.shape and got.dtype == expected.dtype
            np.testing.assert_array_equal(np.asarray(got, np.float32),
                                          np.asarray(expected, np.float32))


def test_values_on_the_e4m3_grid_times_a_power_of_two_come_back_exactly(rng):
    grid = np.asarray(rng.choice(np.arange(-448, 449), size=(4, 256)), np.float32)
    grid = np.asarray(grid.astype(ml_dtypes.float8_e4m3fn), np.float32)  # on e4m3's grid
    grid[:, ::128] = 448  # each tile's max-abs is 448: scale 2^-5 exactly below
    x = jnp.asarray(grid * 2.0**-5)
    q, scales = fp8.quantize_rows(x, power_of_two_scales=True)
    np.testing.assert_array_equal(np.asarray(scales), 2.0**-5)
    np.testing.assert_array_equal(np.asarray(fp8.dequantize_rows(q, scales, jnp.float32)), x)


def test_zero_and_equal_tiles():
    x = jnp.zeros((2, 256)).at[1, 128:].set(-3.25)
    q, scales = fp8.quantize_rows(x)
    np.testing.assert_allclose(np.asarray(scales), [[1, 1], [1, 3.25 / 448]], rtol=2.5e-7)
    back = np.asarray(fp8.dequantize_rows(q, scales, jnp.float32))
    np.testing.assert_array_equal(back[0], 0)
    np.testing.assert_array_equal(np.asarray(q, np.float32)[1, 128:], -448)
    np.testing.assert_allclose(back[1, 128:], -3.25, rtol=2.5e-7)


def test_a_non_finite_value_spoils_its_tile_only():
    x = jnp.ones((2, 256)).at[0, 3].set(jnp.inf).at[1, 200].set(jnp.nan)
    back = np.asarray(fp8.dequantize_rows(*fp8.quantize_rows(x), jnp.float32))
    assert np.all(np.isnan(back[0, :128])) and np.all(np.isnan(back[1, 128:]))
    np.testing.assert_array_equal(back[0, 128:], 1)
    np.testing.assert_array_equal(back[1, :128], 1)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="multiple of tile=128"):
        fp8.quantize_rows(jnp.ones((2, 100)))
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        fp8.quantize_rows(jnp.ones((2, 128), jnp.int32))
    with pytest.raises(TypeError, match="w must be a floating-point array"):
        fp8.quantize_blocks(jnp.ones((2, 128), jnp.int32))
    with pytest.raises(ValueError, match="w must have rank 3"):
        fp8.quantize_weight(jnp.ones((128, 128)))
    q, scales = fp8.quantize_blocks(jnp.ones((256, 256)))
    with pytest.raises(ValueError, match="scales must be"):
        fp8.dequantize_blocks(q, scales[:1])
    q, scales = fp8.quantize_rows(jnp.ones((2, 256)))
    with pytest.raises(ValueError, match="scales must be"):
        fp8.dequantize_rows(q, scales[:, :1])


def columns_by_hand(x, sizes, tile=128):
    """float64 [P, H] of `quantize_columns`' padded layout, built group by group, and each
    group's first tile."""
    x = np.asarray(x, np.float64)
    padded = np.zeros((fp8.padded_rows(x.shape[0], len(sizes), tile), x.shape[1]))
    start, at, firsts = 0, 0, []
    for size in sizes:
        firsts.append(at // tile)
        padded[at:at + size] = x[start:start + size]
        start += size
        at += -(-size // tile) * tile
    return padded, firsts


@pytest.mark.parametrize("sizes", [[70, 0, 100, 30], [200, 0, 0, 0], [0, 0, 0, 0], [1, 129, 40, 0]])
def test_columns_are_each_groups_own_tiles_of_128_rows(rng, sizes):
    """quantize_columns: each group's rows from a tile of their own, a scale per 128 rows x 1
    channel from those rows alone (a group of rows 1e3 larger beside one does not coarsen its
    scales), zeros between groups and after them (scale 1), rows past the groups left out;
    the round trip within e4m3's bound; dequantize_columns puts the rows back."""
    num_rows, width = 256, 256
    x = magnitudes(rng, (num_rows, width))
    x[:70] *= 1e3
    x = jnp.asarray(x, jnp.float32)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    q_t, scales = fp8.quantize_columns(x, group_sizes)
    padded, firsts = columns_by_hand(x, sizes)
    assert q_t.shape == (width, padded.shape[0]) and q_t.dtype == fp8.E4M3
    assert scales.shape == (padded.shape[0] // 128, width)
    np.testing.assert_array_equal(np.asarray(fp8.column_tiles(group_sizes, num_rows)[0]), firsts)
    amax = np.abs(padded.reshape(-1, 128, width)).max(axis=1)
    np.testing.assert_allclose(np.asarray(scales), np.where(amax == 0, 1, amax / 448), rtol=2.5e-7)
    spread = np.repeat(np.asarray(scales, np.float64), 128, axis=0)
    back = np.asarray(q_t.astype(jnp.float32), np.float64).T * spread
    assert_within_e4m3(padded, back, spread)
    np.testing.assert_array_equal(back[padded == 0], 0)
    again = np.asarray(fp8.dequantize_columns(q_t, scales, group_sizes, num_rows, jnp.float32))
    used = sum(sizes)
    np.testing.assert_array_equal(again[used:], 0)
    assert_within_e4m3(np.asarray(x)[:used], again[:used],
                       spread[np.concatenate([np.arange(s, s + n) for s, n in zip(
                           np.asarray(firsts) * 128, sizes)] or [np.zeros(0, int)])])
    with pytest.raises(ValueError, match="q_t must be"):
        fp8.dequantize_columns(q_t[:, :128], scales, group_sizes, num_rows)


@pytest.mark.parametrize("sizes, splits, channels", [
    ([70, 0, 100, 30], None, 128), ([200, 0, 0, 0], 1, 128), ([1, 129, 40, 22], 2, 128),
    ([1, 129, 40, 22], None, 64),  # blocks of 64 channels: four a program
    ([70, 0, 100, 30], 2, 64),
])
def test_columns_kernel_is_the_definition(rng, sizes, splits, channels):
    """jep_kernels.quantize.quantize_columns (Pallas Mosaic GPU; interpreted on the CPU): the
    reference's scales bit for bit, q_t = e4m3(x / scale) (`assert_rounded_from`: exact but
    at ties, where the division may land either side; the interpreter's as well), the padding
    zeros, in every tile of a group; the tiles after the last group's left unwritten (zeros
    in the interpreter, where the reference's scales are 1). Groups starting at rows that are
    no multiple of 8 (the kernel's plain loads), a group of more than one tile, magnitudes
    1e-3 to 1e3; one program a tile or several, blocks of 128 or 64 channels. It lowers for
    Hopper at DeepSeek-V3's 32768 x 7168 in 32 groups."""
    import jep_kernels.quantize

    num_rows, width = 232, 512
    x = magnitudes(rng, (num_rows, width))
    x[3] = 0
    x = jnp.asarray(x, jnp.bfloat16)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    interpret = jax.default_backend() != "gpu"
    q_t, scales = jep_kernels.quantize.quantize_columns(
        x, group_sizes, channels=channels, splits=splits, interpret=interpret)
    want_q, want_scales = fp8.quantize_columns(x, group_sizes)
    assert q_t.shape == want_q.shape and q_t.dtype == fp8.E4M3
    used = sum(-(-size // 128) for size in sizes)  # the groups' tiles, then the rest
    assert used < scales.shape[0]
    np.testing.assert_array_equal(np.asarray(scales[:used]), np.asarray(want_scales[:used]))
    padded, _ = columns_by_hand(x, sizes)
    spread = np.repeat(np.asarray(want_scales, np.float64), 128, axis=0)
    assert_rounded_from(q_t[:, :used * 128], (padded / spread).T[:, :used * 128], ulps=3)
    if interpret:
        np.testing.assert_array_equal(np.asarray(scales[used:]), 0)
        np.testing.assert_array_equal(np.asarray(q_t[:, used * 128:].astype(jnp.float32)), 0)
        assert np.all(np.asarray(want_scales[used:]) == 1)
    spec = (jax.ShapeDtypeStruct((32768, 7168), jnp.bfloat16), jax.ShapeDtypeStruct((32,), jnp.int32))
    jax.jit(lambda x, sizes: jep_kernels.quantize.quantize_columns(
        x, sizes, channels=channels)).trace(*spec).lower(
        lowering_platforms=("cuda",))


def _primitives(jaxpr) -> set[str]:
    """The names of the primitives in a jaxpr and in every jaxpr inside it."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for value in eqn.params.values():
            for inner in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    names |= _primitives(inner)
    return names


def test_kernel_tables_are_made_without_loops():
    """The tables the FP8 kernels read (each tile of the columns layout: its first row of x
    and its rows of the group; each block of the products: its group and rows) are made
    without loops: a GPU runs a while loop's kernels outside the step's CUDA graph, each
    launched on its own. The tiles' rows as the layout has them."""
    from jep_kernels.grouped_matmul import dw_fp8, schedule

    sizes = jnp.asarray([70, 0, 100, 300], jnp.int32)
    for table in (lambda s: dw_fp8.tile_rows(s, 480), lambda s: schedule.work_items(s, 480, 64)):
        names = _primitives(jax.make_jaxpr(table)(sizes).jaxpr)
        assert not names & {"while", "scan", "cond"}, sorted(names)
    # What it looks for: the default binary search is a scan (a while loop in XLA).
    assert "scan" in _primitives(jax.make_jaxpr(
        lambda s: jnp.searchsorted(jnp.cumsum(s), jnp.arange(8)))(sizes).jaxpr)
    row, held = dw_fp8.tile_rows(sizes, 480)
    tiles = 1 + 1 + 3  # 70 rows, 100, 300: a tile each started, then more past 128
    np.testing.assert_array_equal(row[:tiles], [0, 70, 170, 298, 426])
    np.testing.assert_array_equal(held[:tiles], [70, 100, 128, 128, 44])
    assert not np.asarray(held[tiles:]).any()


def test_columns_kernel_refuses_what_it_cannot_take():
    import jep_kernels.quantize

    sizes = jnp.zeros(2, jnp.int32)
    for shape, dtype in [((100, 128), jnp.bfloat16), ((64, 100), jnp.bfloat16),
                         ((64, 128), jnp.float32), ((64, 2, 128), jnp.bfloat16)]:
        assert not jep_kernels.quantize.columns_kernel_takes(jnp.zeros(shape, dtype))
        with pytest.raises(ValueError, match="bf16/f16 with H a multiple of 128 and M of 8"):
            jep_kernels.quantize.quantize_columns(jnp.zeros(shape, dtype), sizes, interpret=True)
    with pytest.raises(ValueError, match="splits must divide"):
        jep_kernels.quantize.quantize_columns(jnp.zeros((64, 384), jnp.bfloat16), sizes,
                                              splits=2, interpret=True)
    with pytest.raises(ValueError, match="channels=32 64 or 128"):
        jep_kernels.quantize.quantize_columns(jnp.zeros((64, 384), jnp.bfloat16), sizes,
                                              channels=32, interpret=True)
    with pytest.raises(ValueError, match="group_sizes must be"):
        jep_kernels.quantize.quantize_columns(jnp.zeros((64, 128), jnp.bfloat16), sizes[None],
                                              interpret=True)


@pytest.mark.parametrize("dtype, tiles, splits", [
    (jnp.bfloat16, 3, 1), (jnp.float32, 3, 1),  # a block's 3 tiles in one program
    (jnp.bfloat16, 3, None),  # one tile a program (`column_splits` for an odd count)
    (jnp.bfloat16, 4, None),  # two tiles a program, two programs a block of rows
])
def test_quantize_kernel_equals_the_reference_bit_for_bit(rng, dtype, tiles, splits):
    """jep_kernels.quantize (Pallas Mosaic GPU; interpreted on the CPU) against jep.fp8's
    reference: two blocks of 64 rows of 128-column tiles, more of them in one program than the
    2 stages in flight, or shared by programs; rows of magnitudes 1e-3 to 1e3, a zero row and
    a zero tile."""
    import jep_kernels.quantize

    x = magnitudes(rng, (128, 128 * tiles))
    x[5] = 0
    x[9, 128:256] = 0
    x = jnp.asarray(x, dtype)
    assert jep_kernels.quantize.column_splits(x.shape[1]) == {3: 3, 4: 2}[tiles]
    q, scales = jep_kernels.quantize.quantize_rows(x, stages=2, splits=splits,
                                                   interpret=jax.default_backend() != "gpu")
    want_q, want_scales = fp8.quantize_rows(x)
    assert q.dtype == fp8.E4M3 and scales.shape == (128, tiles)
    np.testing.assert_array_equal(np.asarray(q.astype(jnp.float32)),
                                  np.asarray(want_q.astype(jnp.float32)))
    np.testing.assert_array_equal(np.asarray(scales), np.asarray(want_scales))
    assert float(scales[5, 0]) == 1.0 and float(scales[9, 1]) == 1.0


@pytest.mark.parametrize("sizes", [[70, 0, 30], [0, 0, 0], [64, 64, 64]])
def test_quantize_kernel_skips_the_rows_past_the_groups(rng, sizes):
    """With group_sizes, jep_kernels.quantize.quantize_rows gives the reference's bytes in
    every block of 64 rows that holds some of the groups' rows (the rows past the groups in
    such a block included) and leaves the blocks past them unwritten: zeros in the
    interpreter, where the reference has the rows' values. Nothing of the groups' rows
    missing, an empty buffer, a full one."""
    import jep_kernels.quantize

    x = jnp.asarray(magnitudes(rng, (192, 256)) + 1.0, jnp.bfloat16)  # no zero row
    group_sizes = jnp.asarray(sizes, jnp.int32)
    interpret = jax.default_backend() != "gpu"
    q, scales = jep_kernels.quantize.quantize_rows(x, group_sizes, stages=2, interpret=interpret)
    want_q, want_scales = fp8.quantize_rows(x)
    kept = -(-sum(sizes) // 64) * 64
    np.testing.assert_array_equal(np.asarray(q[:kept].astype(jnp.float32)),
                                  np.asarray(want_q[:kept].astype(jnp.float32)))
    np.testing.assert_array_equal(np.asarray(scales[:kept]), np.asarray(want_scales[:kept]))
    if interpret:
        np.testing.assert_array_equal(np.asarray(q[kept:].astype(jnp.float32)), 0)
        np.testing.assert_array_equal(np.asarray(scales[kept:]), 0)
        assert np.all(np.asarray(want_scales[kept:]) > 0)
    with pytest.raises(ValueError, match="group_sizes must be"):
        jep_kernels.quantize.quantize_rows(x, group_sizes[None], interpret=True)


@pytest.mark.skipif(not jep.platform.on_hopper(), reason="pack_rows takes the kernel on Hopper")
@pytest.mark.parametrize("hidden", [7168, 1152])  # straight into packed rows; rows, then packed
def test_pack_rows_with_the_kernel_is_the_reference_packed(rng, hidden):
    """On Hopper, FP8 dispatch's pack_rows quantizes with the kernels (rows a multiple of 64):
    stored straight into the packed rows where H is a multiple of 1024, else the rows kernel's
    output packed; the same words as the reference quantization packed, a zero row included."""
    x = magnitudes(rng, (192, hidden))
    x[7] = 0
    x = jnp.asarray(x, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(fp8.pack_rows(x)),
                                  np.asarray(fp8.pack(*fp8.quantize_rows(x))))


@pytest.mark.parametrize("tails", ["kernel", "xla"])
@pytest.mark.parametrize("splits", [None, 1])
def test_packing_kernel_is_the_reference_packed(rng, splits, tails):
    """jep_kernels.quantize.pack_rows (interpreted on the CPU): the kernel's e4m3 tiles stored
    straight into the packed rows, the scales' bytes into their tails by the kernel or by XLA
    after it: the same words as jep.fp8's quantization packed, with four programs a block of
    rows or one; a zero row, a zero tile, and rows of scales from 1e-3 to 1e3 (every byte of
    a scale's word in play). It lowers for Hopper at DeepSeek-V3's 4096 x 7168 and
    refuses an H whose packed rows are not whole 32-byte units, and an unknown `tails`."""
    import jep_kernels.quantize

    x = magnitudes(rng, (128, 1024))
    x[3] = 0
    x[70, 256:384] = 0
    x = jnp.asarray(x, jnp.bfloat16)
    packed = jep_kernels.quantize.pack_rows(x, stages=2, splits=splits, tails=tails,
                                            interpret=jax.default_backend() != "gpu")
    assert packed.shape == (128, fp8.packed_width(1024)) and packed.dtype == jnp.uint32
    np.testing.assert_array_equal(np.asarray(packed), np.asarray(fp8.pack(*fp8.quantize_rows(x))))
    spec = jax.ShapeDtypeStruct((4096, 7168), jnp.bfloat16)
    jax.jit(functools.partial(jep_kernels.quantize.pack_rows, tails=tails)).trace(spec).lower(
        lowering_platforms=("cuda",))
    assert not jep_kernels.quantize.pack_kernel_takes(x[:, :512])
    with pytest.raises(ValueError, match="H a multiple of 1024"):
        jep_kernels.quantize.pack_rows(x[:, :512], interpret=True)
    with pytest.raises(ValueError, match="tails must be one of"):
        jep_kernels.quantize.pack_rows(x, tails="smem", interpret=True)


def test_quantize_kernel_refuses_what_it_cannot_take():
    import jep_kernels.quantize

    for shape, dtype in [((100, 128), jnp.bfloat16), ((64, 100), jnp.bfloat16),
                         ((64, 128), jnp.int32), ((64, 2, 128), jnp.bfloat16)]:
        assert not jep_kernels.quantize.kernel_takes(jnp.zeros(shape, dtype))
        with pytest.raises(ValueError, match="multiple of 128"):
            jep_kernels.quantize.quantize_rows(jnp.zeros(shape, dtype), interpret=True)
    with pytest.raises(ValueError, match="splits must divide"):
        jep_kernels.quantize.quantize_rows(jnp.zeros((64, 384)), splits=2, interpret=True)


@pytest.mark.parametrize("shape, dtype, stages, buffers", [
    ((2, 256, 384), jnp.bfloat16, 2, 2),  # three blocks a band: more than the stages in flight
    ((1, 128, 256), jnp.float16, 1, 2),
    ((2, 256, 384), jnp.bfloat16, 2, 1),  # the stores' one slot reused block after block
])
def test_weight_kernel_is_the_definition_bit_for_bit(rng, shape, dtype, stages, buffers):
    """jep_kernels.quantize.quantize_weight (Pallas Mosaic GPU; interpreted on the CPU): the
    scales of jep.fp8's reference bit for bit, q = e4m3(w / scale) (`assert_rounded_from`:
    exact but at ties, where the GPU's division may land either side; XLA's fusions of the
    reference too, so the kernel is held to the definition, not to them), and q_t exactly q
    transposed. Magnitudes 1e-3 to 1e3 a row: e4m3 subnormals, and within a block values 2^16
    apart, whose quotients sit on e4m3 ties; a block of zeros."""
    import jep_kernels.quantize

    w = magnitudes(rng, shape)
    w[0, :128, :128] = 0
    w = jnp.asarray(w, dtype)
    q, scales, q_t, scales_t = jep_kernels.quantize.quantize_weight(
        w, stages=stages, buffers=buffers, interpret=jax.default_backend() != "gpu")
    want_scales = fp8.quantize_blocks(w)[1]
    np.testing.assert_array_equal(np.asarray(scales), np.asarray(want_scales))
    np.testing.assert_array_equal(np.asarray(scales_t), np.swapaxes(np.asarray(want_scales), 1, 2))
    spread = np.repeat(np.repeat(np.asarray(want_scales, np.float64), 128, axis=1), 128, axis=2)
    assert q.dtype == q_t.dtype == fp8.E4M3 and q_t.shape == (shape[0], shape[2], shape[1])
    assert_rounded_from(q, np.asarray(w, np.float64) / spread, ulps=3)
    np.testing.assert_array_equal(np.asarray(q_t.astype(jnp.float32)),
                                  np.swapaxes(np.asarray(q.astype(jnp.float32)), 1, 2))
    assert float(scales[0, 0, 0]) == 1.0


def test_weight_kernel_lowers_for_hopper_and_refuses_what_it_cannot_take():
    """The weight kernel at DeepSeek-V3's expert shapes lowers for an H100/H200 (layouts and
    shared memory), one store slot or two, from any platform; f32, 3-D-less and partial-block
    weights, and other slot counts, are refused."""
    import jep_kernels.quantize

    for shape in [(256, 7168, 2048), (32, 2048, 7168)]:
        for buffers in (1, 2):
            jax.jit(functools.partial(jep_kernels.quantize.quantize_weight, buffers=buffers)
                    ).trace(jax.ShapeDtypeStruct(shape, jnp.bfloat16)).lower(
                lowering_platforms=("cuda",))
    for shape, dtype in [((2, 128, 128), jnp.float32), ((128, 128), jnp.bfloat16),
                         ((2, 200, 128), jnp.bfloat16), ((2, 128, 100), jnp.bfloat16)]:
        assert not jep_kernels.quantize.weight_kernel_takes(jnp.zeros(shape, dtype))
        with pytest.raises(ValueError, match="multiples of 128"):
            jep_kernels.quantize.quantize_weight(jnp.zeros(shape, dtype), interpret=True)
    with pytest.raises(ValueError, match="buffers=3 1 or 2"):
        jep_kernels.quantize.quantize_weight(jnp.zeros((1, 128, 128), jnp.bfloat16), buffers=3,
                                             interpret=True)
