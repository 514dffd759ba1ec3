"""The Pallas grouped GEMM (jep_kernels.grouped_matmul) against float64 numpy and lax.ragged_dot,
forward and both gradients. On the CPU it runs in Pallas's GPU interpret mode."""

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jep_kernels.grouped_matmul as gm
from jep_kernels.grouped_matmul import mgpu

ON_GPU = jax.default_backend() == "gpu"
CONFIG = gm.Config(block_m=64, block_n=64, block_k=64, max_concurrent_steps=2)
# Two compute warpgroups of 64 columns each (a 128-wide tile), two epilogue tiles of 64 rows.
CONFIG_WS = gm.Config(block_m=128, block_n=64, block_k=64, max_concurrent_steps=2,
                      warp_specialized=True, epilogue_m=64, epilogue_n=64)
# Clusters of two blocks on neighbouring column tiles, sharing (multicasting) the x tile. The
# interpret mode of jax 0.10 cannot run clusters (its run_scoped over the cluster fails): GPU only.
CONFIG_WS_CLUSTER = gm.Config(block_m=128, block_n=64, block_k=64, max_concurrent_steps=2,
                              warp_specialized=True, epilogue_m=64, epilogue_n=64, cluster_n=2)
# The warpgroups split the tile by rows instead: 64 rows of all 128 columns each.
CONFIG_WS_SPLIT_M = gm.Config(block_m=128, block_n=64, block_k=64, max_concurrent_steps=2,
                              warp_specialized=True, epilogue_m=64, epilogue_n=64, split="m")
CONFIG_WS_SPLIT_M_CLUSTER = gm.Config(block_m=128, block_n=64, block_k=64, max_concurrent_steps=2,
                                      warp_specialized=True, epilogue_m=64, epilogue_n=64,
                                      split="m", cluster_n=2)
# Tiles taken in bands of two items, column by column (5 items here: the last band has one).
CONFIG_WS_BAND = gm.Config(block_m=128, block_n=64, block_k=64, max_concurrent_steps=2,
                           warp_specialized=True, epilogue_m=64, epilogue_n=64, band=2)
# Full epilogue tiles through a swizzled shared-memory tile, partial ones row by row.
CONFIG_WS_SWIZZLED = gm.Config(block_m=128, block_n=64, block_k=64, max_concurrent_steps=2,
                               warp_specialized=True, epilogue_m=64, epilogue_n=64,
                               swizzled_epilogue=True)
# Accumulators of 64 rows, each without products when it holds none of the item's rows: blocks
# of 256 rows split by rows (two accumulators a warpgroup), and of 128 split by columns.
CONFIG_WS_ACC_M = gm.Config(block_m=256, block_n=64, block_k=64, max_concurrent_steps=2,
                            warp_specialized=True, epilogue_m=64, epilogue_n=64, split="m",
                            acc_rows=64)
CONFIG_WS_ACC_N = gm.Config(block_m=128, block_n=64, block_k=64, max_concurrent_steps=2,
                            warp_specialized=True, epilogue_m=64, epilogue_n=64, acc_rows=64)
# One ring of stages across all of a program's tiles: three stages for tiles of two steps,
# so that a tile's steps start at every place in the ring; and with 64-row accumulators.
CONFIG_WS_ACROSS = gm.Config(block_m=128, block_n=64, block_k=64, max_concurrent_steps=3,
                             warp_specialized=True, epilogue_m=64, epilogue_n=64,
                             across_tiles=True)
CONFIG_WS_ACC_M_ACROSS = dataclasses.replace(CONFIG_WS_ACC_M, across_tiles=True)
# Blocks of 192 rows split by columns: three 64-row accumulators a warpgroup.
CONFIG_WS_ACC_192 = gm.Config(block_m=192, block_n=64, block_k=64, max_concurrent_steps=2,
                              warp_specialized=True, epilogue_m=64, epilogue_n=64, acc_rows=64)
ON_GPU_ONLY = pytest.mark.skipif(not ON_GPU, reason="clusters run on the GPU only")
# The weight gradient beside them: the plain kernel in 64 x 64 tiles, and the warp-specialized
# one (tiles 128 x 128) beside the warp-specialized products.
DW_SMALL = gm.DwConfig(block_k=64, block_n=64, block_rows=64, max_concurrent_steps=2)
DW_BESIDE_WS = gm.DwConfig(block_k=128, block_n=64, block_rows=64, max_concurrent_steps=2,
                           warp_specialized=True, epilogue_k=64, epilogue_n=64)


def dw_beside(config):
    return DW_BESIDE_WS if config.warp_specialized else DW_SMALL


def numpy_grouped(x, w, sizes):
    """float64 y[rows of g] = x[rows of g] @ w[g]; zeros past the groups."""
    y = np.zeros((x.shape[0], w.shape[2]))
    start = 0
    for g, size in enumerate(sizes):
        end = min(start + int(size), x.shape[0])
        y[start:end] = x[start:end] @ w[g]
        start = end
    return y


@pytest.mark.parametrize("config, sizes", [
    (CONFIG, [70, 0, 100]),        # an empty group; blocks straddle the boundaries; a zero tail
    (CONFIG, [0, 200, 0]),         # every row to one group
    (CONFIG, [64, 64, 72]),        # on block boundaries, then off; no tail
    (CONFIG, [0, 0, 0]),           # nothing: all zeros
    (CONFIG, [150, 100, 90]),      # sums past M: the last group is cut at M
    pytest.param(CONFIG_WS, [70, 0, 100], marks=pytest.mark.slow),
    pytest.param(CONFIG_WS_CLUSTER, [70, 0, 100], marks=ON_GPU_ONLY),
    pytest.param(CONFIG_WS, [0, 200, 0], marks=pytest.mark.slow),  # plain's runs in main
    (CONFIG_WS, [33, 31, 1]),      # boundaries inside one epilogue tile; a long zero tail
    pytest.param(CONFIG_WS_CLUSTER, [33, 31, 1], marks=ON_GPU_ONLY),
    pytest.param(CONFIG_WS, [0, 0, 0], marks=pytest.mark.slow),  # the plain kernel's case runs in the main job
    pytest.param(CONFIG_WS, [150, 100, 90], marks=pytest.mark.slow),  # as is plain's
    pytest.param(CONFIG_WS_SPLIT_M, [70, 0, 100], marks=pytest.mark.slow),
    pytest.param(CONFIG_WS_SPLIT_M, [33, 31, 1], marks=pytest.mark.slow),
    pytest.param(CONFIG_WS_SPLIT_M, [0, 200, 0], marks=pytest.mark.slow),
    pytest.param(CONFIG_WS_SPLIT_M_CLUSTER, [33, 31, 1], marks=ON_GPU_ONLY),
    pytest.param(CONFIG_WS_BAND, [70, 0, 100], marks=pytest.mark.slow),
    pytest.param(CONFIG_WS_BAND, [33, 31, 1], marks=pytest.mark.slow),
    pytest.param(CONFIG_WS_SWIZZLED, [70, 0, 100], marks=pytest.mark.slow),
    pytest.param(CONFIG_WS_SWIZZLED, [64, 64, 72], marks=pytest.mark.slow),
    # The first group's 70 rows shared out at 64 rows a warpgroup; the last group's block:
    # rows in 3 of its 4 accumulators.
    pytest.param(CONFIG_WS_ACC_M, [70, 0, 130], marks=pytest.mark.slow),
    pytest.param(CONFIG_WS_ACC_M, [0, 200, 0], marks=pytest.mark.slow),
    # Each group's block within its first 128 rows: shared out at 64 rows a warpgroup.
    pytest.param(CONFIG_WS_ACC_M, [120, 80, 0], marks=pytest.mark.slow),
    pytest.param(CONFIG_WS_ACC_N, [33, 100, 1],  # a tail of 5 rows: one of two accumulators
                 marks=pytest.mark.slow),
    pytest.param(CONFIG_WS_ACC_192, [70, 0, 130],  # rows in 2 of 3 accumulators, then 3 of 3
                 marks=pytest.mark.slow),
    pytest.param(CONFIG_WS_ACROSS, [70, 0, 100],  # the FP8 kernel's ring: main job
                 marks=pytest.mark.slow),
    pytest.param(CONFIG_WS_ACROSS, [33, 31, 1], marks=pytest.mark.slow),
    pytest.param(CONFIG_WS_ACROSS, [0, 0, 0], marks=pytest.mark.slow),
    pytest.param(CONFIG_WS_ACC_M_ACROSS, [70, 0, 130], marks=pytest.mark.slow),
    pytest.param(CONFIG_WS_ACC_M_ACROSS, [0, 200, 0], marks=pytest.mark.slow),
], ids=lambda v: {id(CONFIG): "plain", id(CONFIG_WS): "ws", id(CONFIG_WS_CLUSTER): "ws-cluster",
                  id(CONFIG_WS_SPLIT_M): "ws-split-m",
                  id(CONFIG_WS_SPLIT_M_CLUSTER): "ws-split-m-cluster",
                  id(CONFIG_WS_BAND): "ws-band",
                  id(CONFIG_WS_SWIZZLED): "ws-swizzled", id(CONFIG_WS_ACC_M): "ws-acc-rows-m",
                  id(CONFIG_WS_ACC_N): "ws-acc-rows-n", id(CONFIG_WS_ACROSS): "ws-across",
                  id(CONFIG_WS_ACC_M_ACROSS): "ws-acc-rows-m-across",
                  id(CONFIG_WS_ACC_192): "ws-acc-rows-192"}.get(id(v)))
def test_forward_and_gradients_match_references(config, sizes):
    rng = np.random.default_rng(len(sizes) + sum(sizes))
    # The tile width of the warp-specialized kernel (2 block_n per cluster block) for N, and for
    # K, which is dx's N. Two column blocks with bands, so that their order shows.
    m, k = 200, 128 * config.cluster_n
    n = 64 * (2 * config.cluster_n if config.warp_specialized else 1) * (2 if config.band > 1 else 1)
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(len(sizes), k, n)) / k**0.5, jnp.bfloat16)
    dy = jnp.asarray(rng.normal(size=(m, n)), jnp.bfloat16)
    group_sizes = jnp.asarray(sizes, jnp.int32)

    y, vjp = jax.vjp(lambda x, w: gm.grouped_matmul(x, w, group_sizes, config=config,
                                                    dw_config=dw_beside(config),
                                                    interpret=not ON_GPU), x, w)
    dx, dw = vjp(dy)

    x64, w64, dy64 = (np.asarray(a, np.float64) for a in (x, w, dy))
    want_y = numpy_grouped(x64, w64, sizes)
    want_dx = numpy_grouped(dy64, np.swapaxes(w64, 1, 2), sizes)
    want_dw = np.zeros(w.shape)
    start = 0
    for g, size in enumerate(sizes):
        end = min(start + size, m)
        want_dw[g] = x64[start:end].T @ dy64[start:end]
        start = end
    np.testing.assert_allclose(np.asarray(y, np.float64), want_y, rtol=1e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(dx, np.float64), want_dx, rtol=1e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(dw, np.float64), want_dw, rtol=1e-2, atol=6e-2)
    assert not np.asarray(y[min(sum(sizes), m):]).any()
    # The same products as lax.ragged_dot's (both sum in float32, round once to bf16).
    want = jax.vjp(lambda x, w: lax.ragged_dot(x, w, group_sizes), x, w)
    for got, expected in zip((y, dx, dw), (want[0],) + want[1](dy)):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32),
                                   rtol=1e-2, atol=1e-1)


# The weight gradient's kernels on their own: one warpgroup (rows in aligned blocks, x masked)
# and warp-specialized (one pipeline over all tiles, each group's rows loaded from its first
# row, dy masked past its end). Tiles of 128 x 128 (K x N) in both; 64-row steps.
DW_PLAIN = gm.DwConfig(block_k=128, block_n=128, block_rows=64, max_concurrent_steps=2)
DW_WS = gm.DwConfig(block_k=128, block_n=64, block_rows=64, max_concurrent_steps=2,
                    warp_specialized=True, epilogue_k=64, epilogue_n=64)
# Three stages, one piece per epilogue (the stores alternate buffers across tiles), and two
# tiles along K: the ring of stages runs on across tiles with an odd number of steps.
DW_WS_THREE_STAGES = gm.DwConfig(block_k=64, block_n=64, block_rows=64, max_concurrent_steps=3,
                                 warp_specialized=True, epilogue_k=64, epilogue_n=64)
# The whole tile stored from one buffer, waited for only before the next tile's store.
DW_WS_ONE_BUFFER = gm.DwConfig(block_k=128, block_n=64, block_rows=64, max_concurrent_steps=2,
                               warp_specialized=True, epilogue_k=128, epilogue_n=64)
# dy's rows held for a run of both K tiles where a group takes at most two steps (three dy
# stages, two of x), else loaded for each tile; runs of one K tile.
DW_WS_RESIDENT = gm.DwConfig(block_k=64, block_n=64, block_rows=64, max_concurrent_steps=2,
                             warp_specialized=True, resident_steps=3)
DW_WS_RESIDENT_RUNS = gm.DwConfig(block_k=64, block_n=64, block_rows=64, max_concurrent_steps=3,
                                  warp_specialized=True, resident_steps=2, run_k_blocks=1)


DW_SIZES = [
    [70, 0, 100, 30],      # an empty group; a zero tail past the last group
    [0, 200, 0, 0],        # every row in one group
    [1, 1, 1, 197],        # one-row groups
    [64, 64, 64, 8],       # sizes on the 64-row steps, then one short
    [0, 0, 0, 0],          # nothing: all zeros
    [150, 100, 90, 5],     # sums past M: cut at M; the last groups get nothing
    [65, 63, 2, 70],       # sizes one off the steps
]


def _dw_cases():
    """Each config with each of DW_SIZES, ids "sizes{i}-{config}". The main job takes plain and
    ws with all of them and ws-resident with four (an empty group, one group, sizes on and one
    off the steps); the rest run in the slow job, to keep CI in its time."""
    configs = {"plain": DW_PLAIN, "ws": DW_WS, "ws-3-stages": DW_WS_THREE_STAGES,
               "ws-one-buffer": DW_WS_ONE_BUFFER, "ws-resident": DW_WS_RESIDENT,
               "ws-resident-runs": DW_WS_RESIDENT_RUNS}
    for name, config in configs.items():
        for i, sizes in enumerate(DW_SIZES):
            slow = name not in ("plain", "ws", "ws-resident") or (
                name == "ws-resident" and i in (2, 4, 5))
            yield pytest.param(config, sizes, id=f"sizes{i}-{name}",
                               marks=pytest.mark.slow if slow else ())


@pytest.mark.parametrize("config, sizes", list(_dw_cases()))
def test_weight_gradient_matches_float64(config, sizes):
    rng = np.random.default_rng(sum(sizes) + len(sizes))
    m, k, n = 200, 128, 128
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    dy = jnp.asarray(rng.normal(size=(m, n)), jnp.bfloat16)
    got = mgpu.grouped_matmul_dw(x, dy, jnp.asarray(sizes, jnp.int32), config=config,
                                 out_dtype=jnp.float32, interpret=not ON_GPU)
    assert got.shape == (len(sizes), k, n) and got.dtype == jnp.float32
    x64, dy64 = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    want, start = np.zeros(got.shape), 0
    for g, size in enumerate(sizes):
        end = min(start + size, m)
        want[g] = x64[start:end].T @ dy64[start:end]
        start = end
    # float32 sums of exact bf16 products: float32 rounding only.
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("config", [DW_PLAIN, DW_WS, DW_WS_THREE_STAGES, DW_WS_RESIDENT],
                         ids=["plain", "ws", "ws-3-stages", "ws-resident"])
@pytest.mark.parametrize("chunk_rows, sizes", [
    ((100, 100), [[70, 0, 20, 10], [0, 50, 50, 0]]),  # chunk 1 starts off the 8-row tiling
    ((100, 100), [[0, 0, 0, 0], [25, 25, 25, 25]]),   # a chunk with nothing
    ((100, 100), [[100, 0, 0, 0], [0, 0, 0, 100]]),   # each chunk's rows in one group
    ((100, 100), [[30, 30, 10, 0], [1, 1, 1, 1]]),    # rows past each chunk's groups
    ((120, 72), [[60, 60, 0, 0], [0, 0, 40, 32]]),    # chunks of two sizes, 8 rows unused
])
def test_weight_gradient_sums_each_groups_rows_over_the_chunks(config, chunk_rows, sizes):
    rng = np.random.default_rng(sum(map(sum, sizes)))
    m, k, n = 200, 128, 128
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    dy = jnp.asarray(rng.normal(size=(m, n)), jnp.bfloat16)
    got = mgpu.grouped_matmul_dw(x, dy, jnp.asarray(sizes, jnp.int32), config=config,
                                 out_dtype=jnp.float32, chunk_rows=chunk_rows,
                                 interpret=not ON_GPU)
    x64, dy64 = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    want, offset = np.zeros(got.shape), 0
    for rows, chunk_sizes in zip(chunk_rows, sizes):
        start = offset
        for g, size in enumerate(chunk_sizes):
            want[g] += x64[start:start + size].T @ dy64[start:start + size]
            start += size
        offset += rows
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-4)


def test_weight_gradient_chunks_must_match_their_group_sizes():
    x = jnp.zeros((64, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="group_sizes must be \\[C, G\\] for the C=2 chunks"):
        mgpu.grouped_matmul_dw(x, x, jnp.zeros((3, 2), jnp.int32), config=DW_WS,
                               chunk_rows=(32, 32), interpret=True)
    with pytest.raises(ValueError, match="at most M=64"):
        mgpu.grouped_matmul_dw(x, x, jnp.zeros((2, 2), jnp.int32), config=DW_WS,
                               chunk_rows=(40, 32), interpret=True)
    with pytest.raises(ValueError, match="without chunk_rows"):
        mgpu.grouped_matmul_dw(x, x, jnp.zeros((2, 2), jnp.int32), config=DW_WS, interpret=True)


@pytest.mark.slow
def test_chunks_equal_a_product_per_chunk_with_one_weight_gradient():
    # The plain dw kernel's segments are tested against float64 above.
    config, dw_config = CONFIG_WS, DW_WS
    rng = np.random.default_rng(5)
    k, n = 128, 128
    rows = (100, 60, 36)
    sizes = [[40, 0, 60], [0, 0, 0], [30, 6, 0]]  # a chunk with nothing; rows past its groups
    xs = [jnp.asarray(rng.normal(size=(r, k)), jnp.bfloat16) for r in rows]
    dys = [jnp.asarray(rng.normal(size=(r, n)), jnp.bfloat16) for r in rows]
    w = jnp.asarray(rng.normal(size=(3, k, n)) / np.sqrt(k), jnp.bfloat16)
    group_sizes = [jnp.asarray(s, jnp.int32) for s in sizes]

    def run(chunked, xs, w):
        if chunked:
            return gm.grouped_matmul_chunks(xs, w, group_sizes, config=config,
                                            dw_config=dw_config, interpret=not ON_GPU)
        return tuple(gm.grouped_matmul(x, w, s, config=config, dw_config=dw_config,
                                       interpret=not ON_GPU)
                     for x, s in zip(xs, group_sizes))

    outs = {}
    for chunked in (True, False):
        ys, vjp = jax.vjp(lambda xs, w, chunked=chunked: run(chunked, xs, w), xs, w)
        outs[chunked] = (ys, *vjp(tuple(dys)))
    (ys, dxs, dw), (ys_each, dxs_each, dw_each) = outs[True], outs[False]
    for got, want in zip([*ys, *dxs], [*ys_each, *dxs_each]):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # One float32 sum over every chunk's rows, rounded once (the per-chunk gradients are each
    # rounded, then summed): against float64.
    want = np.zeros(dw.shape)
    for x, dy, chunk in zip(xs, dys, sizes):
        x64, dy64, start = np.asarray(x, np.float64), np.asarray(dy, np.float64), 0
        for g, size in enumerate(chunk):
            want[g] += x64[start:start + size].T @ dy64[start:start + size]
            start += size
    np.testing.assert_allclose(np.asarray(dw, np.float64), want, rtol=1e-2, atol=5e-2)
    assert dw.dtype == jnp.bfloat16


# The summing kernel: the ring of CONFIG_WS_ACROSS (three stages; pairs of two and one steps,
# so that a pair's steps start at every place in the ring), and 192-row blocks.
@pytest.mark.parametrize("config, sizes, transpose_w", [
    (CONFIG_WS_ACROSS, [70, 0, 100], True),
    pytest.param(CONFIG_WS_ACROSS, [33, 31, 1], False, marks=pytest.mark.slow),
    pytest.param(CONFIG_WS_ACROSS, [0, 0, 0], True, marks=pytest.mark.slow),
    pytest.param(dataclasses.replace(CONFIG_WS_ACC_192, max_concurrent_steps=3, across_tiles=True),
                 [0, 200, 0], True, marks=pytest.mark.slow),
], ids=["across", "across-plain-w", "across-empty", "acc-rows-192-across"])
def test_sum_of_products_matches_float64(config, sizes, transpose_w):
    rng = np.random.default_rng(sum(sizes) + transpose_w)
    m, n, depths = 200, 128, (128, 64)
    xs = [jnp.asarray(rng.normal(size=(m, d)), jnp.bfloat16) for d in depths]
    ws = [jnp.asarray(rng.normal(size=(len(sizes), d, n)) / np.sqrt(d), jnp.bfloat16)
          for d in depths]
    group_sizes = jnp.asarray(sizes, jnp.int32)
    given = [jnp.swapaxes(w, 1, 2) for w in ws] if transpose_w and ON_GPU else ws
    y = mgpu.grouped_matmul_sum(xs, given, group_sizes, transpose_w=transpose_w and ON_GPU,
                                config=config, interpret=not ON_GPU)
    want = sum(numpy_grouped(np.asarray(x, np.float64), np.asarray(w, np.float64), sizes)
               for x, w in zip(xs, ws))
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=1e-2, atol=3e-2)
    assert not np.asarray(y[sum(sizes):]).any()


# The gated kernel (gate and up from one load of x, act(gate) * up in the epilogue): the ring
# of CONFIG_WS_ACROSS, and 64-row accumulators in blocks split by rows.
@pytest.mark.parametrize("config, sizes, activation", [
    (CONFIG_WS_ACROSS, [70, 0, 100], "silu"),   # an empty group, a zero tail
    pytest.param(CONFIG_WS_ACROSS, [0, 200, 0], "gelu", marks=pytest.mark.slow),  # one group
    pytest.param(CONFIG_WS_ACC_M_ACROSS, [1, 33, 150], "relu", marks=pytest.mark.slow),
], ids=["across-silu", "across-gelu-one-group", "acc-rows-split-m-relu"])
def test_gated_products_match_float64(config, sizes, activation):
    rng = np.random.default_rng(len(activation) + sum(sizes))
    m, k, n = 200, 128, 128
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    w_gate, w_up = (jnp.asarray(rng.normal(size=(len(sizes), k, n)) / np.sqrt(k), jnp.bfloat16)
                    for _ in range(2))
    h, gate, up = mgpu.grouped_matmul_gated(x, w_gate, w_up, jnp.asarray(sizes, jnp.int32),
                                            activation=activation, config=config,
                                            interpret=not ON_GPU)
    x64 = np.asarray(x, np.float64)
    gate64 = numpy_grouped(x64, np.asarray(w_gate, np.float64), sizes)
    up64 = numpy_grouped(x64, np.asarray(w_up, np.float64), sizes)
    act = {"silu": jax.nn.silu, "gelu": jax.nn.gelu, "relu": jax.nn.relu}[activation]
    h64 = np.asarray(act(jnp.asarray(gate64, jnp.float32)), np.float64) * up64
    for got, want in ((gate, gate64), (up, up64), (h, h64)):
        assert got.dtype == jnp.bfloat16 and got.shape == (m, n)
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-2, atol=3e-2)
        assert not np.asarray(got[min(sum(sizes), m):]).any()


@pytest.mark.slow
@pytest.mark.parametrize("num_chunks", [1, 2])
def test_gated_expert_half_and_its_gradients_match_float64(num_chunks):
    # act(x @ w_gate) * (x @ w_up) in one kernel a chunk, and its backward (the activation's
    # gradient, then dx summed and each weight's gradient once over the chunks), against
    # float64 forward and gradients of a random projection of the outputs.
    rng = np.random.default_rng(5 + num_chunks)
    k, n = 128, 128
    rows, sizes = ((40, 24), ([16, 0, 20], [10, 8, 0]))  # empty groups, zero tails
    rows, sizes = rows[:num_chunks], sizes[:num_chunks]
    xs = tuple(jnp.asarray(rng.normal(size=(r, k)), jnp.bfloat16) for r in rows)
    w_gate, w_up = (jnp.asarray(rng.normal(size=(3, k, n)) / np.sqrt(k), jnp.bfloat16)
                    for _ in range(2))
    probes = [rng.normal(size=(r, n)) for r in rows]
    group_sizes = [jnp.asarray(s, jnp.int32) for s in sizes]

    def loss(xs, w_gate, w_up):
        hs = gm.grouped_matmul_gated(xs, w_gate, w_up, group_sizes, config=CONFIG_WS_ACROSS,
                                     interpret=not ON_GPU)
        return sum(jnp.sum(h.astype(jnp.float32) * p) for h, p in zip(hs, probes)), hs

    (_, hs), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(xs, w_gate, w_up)

    def loss64(xs, w_gate, w_up):
        total = 0.0
        for x, p, chunk in zip(xs, probes, sizes):
            ends = np.cumsum(chunk)
            group = jnp.searchsorted(jnp.asarray(ends), jnp.arange(x.shape[0]), side="right")
            inside = (group < len(chunk))[:, None]
            g = jnp.einsum("mk,mkn->mn", x, w_gate[jnp.minimum(group, len(chunk) - 1)])
            u = jnp.einsum("mk,mkn->mn", x, w_up[jnp.minimum(group, len(chunk) - 1)])
            total = total + jnp.sum(jnp.where(inside, jax.nn.silu(g) * u, 0.0) * p)
        return total

    with jax.enable_x64():
        as64 = lambda a: jnp.asarray(np.asarray(a, np.float64))  # noqa: E731
        want = jax.grad(loss64, argnums=(0, 1, 2))(tuple(as64(x) for x in xs), as64(w_gate),
                                                    as64(w_up))
        for h, x, p, chunk in zip(hs, xs, probes, sizes):
            x64 = np.asarray(x, np.float64)
            g64 = numpy_grouped(x64, np.asarray(w_gate, np.float64), chunk)
            u64 = numpy_grouped(x64, np.asarray(w_up, np.float64), chunk)
            h64 = np.asarray(jax.nn.silu(jnp.asarray(g64)), np.float64) * u64
            np.testing.assert_allclose(np.asarray(h, np.float64), h64, rtol=1e-2, atol=3e-2)
        for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
            assert got.dtype == jnp.bfloat16
            scale = np.abs(np.asarray(expected)).max()
            np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(expected),
                                       atol=2e-2 * scale)


def test_gated_products_refuse_what_they_cannot_take():
    x, w, sizes = jnp.zeros((8, 128), jnp.bfloat16), jnp.zeros((2, 128, 128), jnp.bfloat16), (
        jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match="needs a warp-specialized config with across_tiles"):
        mgpu.grouped_matmul_gated(x, w, w, sizes, config=CONFIG_WS)
    with pytest.raises(ValueError, match="activation must be one of"):
        mgpu.grouped_matmul_gated(x, w, w, sizes, activation="tanh", config=CONFIG_WS_ACROSS)
    with pytest.raises(ValueError, match="w_up must be w_gate's shape"):
        mgpu.grouped_matmul_gated(x, w, jnp.zeros((2, 128, 256), jnp.bfloat16), sizes,
                                  config=CONFIG_WS_ACROSS)


def test_sum_of_products_refuses_what_it_cannot_take():
    x, w, sizes = jnp.zeros((8, 128), jnp.bfloat16), jnp.zeros((2, 128, 128), jnp.bfloat16), (
        jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match="needs a warp-specialized config with across_tiles"):
        mgpu.grouped_matmul_sum([x, x], [w, w], sizes, config=CONFIG_WS)
    with pytest.raises(ValueError, match="xs and ws must be as many"):
        mgpu.grouped_matmul_sum([x, x], [w], sizes, config=CONFIG_WS_ACROSS)
    with pytest.raises(ValueError, match="ws must have the same N"):
        mgpu.grouped_matmul_sum([x, x], [w, jnp.zeros((2, 128, 256), jnp.bfloat16)], sizes,
                                config=CONFIG_WS_ACROSS)
    with pytest.raises(ValueError, match="ws must be one or more weights of one shape"):
        gm.grouped_matmul_weights([x], [w, jnp.zeros((2, 128, 256), jnp.bfloat16)], [sizes])


@pytest.mark.slow
@pytest.mark.parametrize("num_chunks", [1, 2])
def test_products_with_several_weights_equal_one_product_each(num_chunks):
    # The gate and up products of a SwiGLU expert: the forward as one product each, dx summed
    # in one kernel (against float64: the separate products round each dx, then sum), each
    # weight's gradient as grouped_matmul's. The plain kernels (fast to interpret) for the
    # forward and dw; the summed dx takes the warp-specialized default made to sum.
    config, dw_config = CONFIG, DW_SMALL
    rng = np.random.default_rng(11 + num_chunks)
    k, n = 128, 128
    rows, sizes = ((100, 60), ([40, 0, 50], [20, 40, 0]))
    rows, sizes = rows[:num_chunks], sizes[:num_chunks]
    xs = [jnp.asarray(rng.normal(size=(r, k)), jnp.bfloat16) for r in rows]
    ws = [jnp.asarray(rng.normal(size=(3, k, n)) / np.sqrt(k), jnp.bfloat16) for _ in range(2)]
    dys = [[jnp.asarray(rng.normal(size=(r, n)), jnp.bfloat16) for r in rows] for _ in ws]
    group_sizes = [jnp.asarray(s, jnp.int32) for s in sizes]
    ys, vjp = jax.vjp(lambda xs, ws: gm.grouped_matmul_weights(
        xs, ws, group_sizes, config=config, dw_config=dw_config, interpret=not ON_GPU), xs, ws)
    dxs, dws = vjp(tuple(tuple(d) for d in dys))
    for j, w in enumerate(ws):
        each, each_vjp = jax.vjp(lambda xs, w: gm.grouped_matmul_chunks(
            xs, w, group_sizes, config=config, dw_config=dw_config, interpret=not ON_GPU), xs, w)
        _, dw_each = each_vjp(tuple(dys[j]))
        for got, want in zip(ys[j], each):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        np.testing.assert_array_equal(np.asarray(dws[j]), np.asarray(dw_each))
    as64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    for c, (dx, chunk) in enumerate(zip(dxs, sizes)):
        want = sum(numpy_grouped(as64(dys[j][c]), np.swapaxes(as64(w), 1, 2), chunk)
                   for j, w in enumerate(ws))
        np.testing.assert_allclose(as64(dx), want, rtol=1e-2, atol=3e-2)
        assert dx.dtype == jnp.bfloat16


def test_weight_gradient_in_the_weights_dtype_rounds_once():
    # dw comes out of the kernel in the dtype asked for: in bf16 it is the float32 result
    # rounded once.
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(96, 128)), jnp.bfloat16)
    dy = jnp.asarray(rng.normal(size=(96, 128)), jnp.bfloat16)
    sizes = jnp.asarray([40, 56], jnp.int32)
    run = lambda dtype: mgpu.grouped_matmul_dw(x, dy, sizes, config=DW_WS, out_dtype=dtype,  # noqa: E731
                                               interpret=not ON_GPU)
    wide, narrow = run(jnp.float32), run(jnp.bfloat16)
    assert narrow.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(narrow), np.asarray(wide.astype(jnp.bfloat16)))


FP8_CONFIG = gm.Config(block_m=128, block_n=64, block_k=128, max_concurrent_steps=2,
                       warp_specialized=True, epilogue_m=64, epilogue_n=64)
# Each warpgroup 64 rows of the 128 columns: its rows' scales, one w block's.
FP8_CONFIG_SPLIT_M = dataclasses.replace(FP8_CONFIG, split="m")
FP8_CONFIG_ACROSS = dataclasses.replace(FP8_CONFIG_SPLIT_M, max_concurrent_steps=3,
                                        across_tiles=True)
# Two blocks of a cluster on neighbouring column tiles, sharing x's tile (GPU only).
FP8_CONFIG_CLUSTER = dataclasses.replace(FP8_CONFIG_SPLIT_M, cluster_n=2)
# Blocks of 256 rows, each warpgroup's 128 in two sums of 64 rows promoted in turn.
FP8_CONFIG_TALL = dataclasses.replace(FP8_CONFIG_SPLIT_M, block_m=256, acc_rows=64)
FP8_CONFIG_TALL_ACROSS = dataclasses.replace(FP8_CONFIG_TALL, max_concurrent_steps=3,
                                             across_tiles=True)


@pytest.mark.parametrize("config, sizes", [
    # An empty group, blocks straddling the boundaries, a zero tail.
    pytest.param(FP8_CONFIG, [70, 0, 100], marks=pytest.mark.slow),
    pytest.param(FP8_CONFIG, [0, 200, 0], marks=pytest.mark.slow),  # every row to one group
    pytest.param(FP8_CONFIG, [33, 31, 1],  # boundaries inside an epilogue tile, a one-row
                 marks=pytest.mark.slow),  # group, a tail (across-tiles' in main)
    pytest.param(FP8_CONFIG_SPLIT_M, [33, 31, 1], marks=pytest.mark.slow),
    pytest.param(FP8_CONFIG_SPLIT_M, [70, 0, 100], marks=pytest.mark.slow),
    (FP8_CONFIG_ACROSS, [70, 0, 100]),
    pytest.param(FP8_CONFIG_CLUSTER, [33, 31, 1], marks=ON_GPU_ONLY),
    pytest.param(FP8_CONFIG_CLUSTER, [70, 0, 100], marks=ON_GPU_ONLY),
    (FP8_CONFIG_TALL, [70, 0, 100]),  # a warpgroup's rows past a group's end in a second sum
    pytest.param(FP8_CONFIG_TALL_ACROSS, [33, 31, 1], marks=pytest.mark.slow),
], ids=lambda v: {id(FP8_CONFIG): "split-n", id(FP8_CONFIG_SPLIT_M): "split-m",
                  id(FP8_CONFIG_ACROSS): "across-tiles", id(FP8_CONFIG_CLUSTER): "cluster",
                  id(FP8_CONFIG_TALL): "tall", id(FP8_CONFIG_TALL_ACROSS): "tall-across"
                  }.get(id(v)))
def test_fp8_kernel_matches_float64_of_its_quantized_operands(config, sizes):
    """grouped_matmul_fp8 against float64 products of the dequantized e4m3 operands: the
    kernel sums each 128-deep block in float32 and scales it, so the two agree to float32
    rounding when interpreted. Hopper's tensor cores keep fewer bits (about 14) while they sum
    a block's FP8 products (DeepSeek-V3's report, 3.3.2; the reason for the promotion to
    float32 every 128): on an H200 the error is 2-3e-4 of the largest entry, so the bound there
    is 1e-3. Rows of very different scales, so that a scale applied to the wrong rows, block
    or step shows."""
    from jep import fp8

    rng = np.random.default_rng(sum(sizes) + len(sizes))
    m, k, n = 200, 256, 256  # two K steps and two scale blocks of N
    x = jnp.asarray(rng.normal(size=(m, k)) * np.exp(2 * rng.normal(size=(m, 2)).repeat(128, 1)),
                    jnp.float32)
    v = jnp.asarray(rng.normal(size=(len(sizes), k, n)) * np.exp(rng.normal(
        size=(len(sizes), 2, 1, 2, 1))).repeat(128, 2).repeat(128, 4).reshape(-1, k, n),
        jnp.float32)
    x_q, x_scales = fp8.quantize_rows(x)
    weight = fp8.quantize_weight(v)
    y = gm.grouped_matmul_fp8(x_q, x_scales, weight.q_t, weight.scales_t,
                              jnp.asarray(sizes, jnp.int32), config=config,
                              out_dtype=jnp.float32, interpret=not ON_GPU)
    x64 = np.asarray(fp8.dequantize_rows(x_q, x_scales, jnp.float32), np.float64)
    v64 = np.asarray(fp8.dequantize_blocks(weight.q, weight.scales, jnp.float32), np.float64)
    want = numpy_grouped(x64, v64, sizes)
    assert y.dtype == jnp.float32 and y.shape == (m, n)
    bound = 1e-3 if ON_GPU else 1e-5
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=bound,
                               atol=bound * np.abs(want).max())
    assert not np.asarray(y[sum(sizes):]).any()
    # dx's form, the same kernel: dy @ v[g]^T reads v's own e4m3 blocks (K-major for it).
    dy_q, dy_scales = fp8.quantize_rows(jnp.asarray(rng.normal(size=(m, n)), jnp.float32))
    dx = gm.grouped_matmul_fp8(dy_q, dy_scales, weight.q, weight.scales,
                               jnp.asarray(sizes, jnp.int32), config=config,
                               interpret=not ON_GPU)
    dy64 = np.asarray(fp8.dequantize_rows(dy_q, dy_scales, jnp.float32), np.float64)
    want_dx = numpy_grouped(dy64, np.swapaxes(v64, 1, 2), sizes)
    assert dx.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(dx, np.float64), want_dx, rtol=1e-2,
                               atol=1e-2 * np.abs(want_dx).max())


@pytest.mark.parametrize("sizes", [[33, 31, 1], pytest.param([0, 200, 0], marks=pytest.mark.slow)])
def test_fp8_sum_of_products_matches_float64(sizes):
    """The FP8 kernel's sum of two products of the same rows (the gate and up dx: dg @ w_g^T
    + du @ w_u^T, contractions of 128 and 256 here, so that the steps of the second pair take
    their scales from after the first's) against float64 of the dequantized operands, and
    refusals: pairs of unequal count or rows, a config without the ring."""
    from jep import fp8

    rng = np.random.default_rng(sum(sizes))
    m, n = 200, 256
    group_sizes = jnp.asarray(sizes, jnp.int32)
    want = np.zeros((m, n))
    xs, x_scales, ws, w_scales = [], [], [], []
    for k in (128, 256):
        x = jnp.asarray(rng.normal(size=(m, k)) * np.exp(2 * rng.normal(size=(m, 1))),
                        jnp.float32)
        v = jnp.asarray(rng.normal(size=(len(sizes), k, n)) * np.exp(rng.normal(
            size=(len(sizes), k // 128, 1, 2, 1))).repeat(128, 2).repeat(128, 4).reshape(
            -1, k, n), jnp.float32)
        x_q, x_s = fp8.quantize_rows(x)
        weight = fp8.quantize_weight(v)
        for parts, part in zip((xs, x_scales, ws, w_scales),
                               (x_q, x_s, weight.q_t, weight.scales_t)):
            parts.append(part)
        want += numpy_grouped(np.asarray(fp8.dequantize_rows(x_q, x_s, jnp.float32), np.float64),
                              np.asarray(fp8.dequantize_blocks(weight.q, weight.scales,
                                                               jnp.float32), np.float64), sizes)
    y = gm.grouped_matmul_fp8(xs, x_scales, ws, w_scales, group_sizes, config=FP8_CONFIG_ACROSS,
                              out_dtype=jnp.float32, interpret=not ON_GPU)
    bound = 1e-3 if ON_GPU else 1e-5
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=bound,
                               atol=bound * np.abs(want).max())
    assert not np.asarray(y[sum(sizes):]).any()
    with pytest.raises(ValueError, match="sequences of one length"):
        gm.grouped_matmul_fp8(xs, x_scales[:1], ws, w_scales, group_sizes)
    with pytest.raises(ValueError, match="across_tiles=True"):
        gm.grouped_matmul_fp8(xs, x_scales, ws, w_scales, group_sizes, config=FP8_CONFIG_SPLIT_M)
    with pytest.raises(ValueError, match="the same rows"):
        gm.grouped_matmul_fp8([xs[0], xs[1][:8]], [x_scales[0], x_scales[1][:8]], ws, w_scales,
                              group_sizes, config=FP8_CONFIG_ACROSS)


@pytest.mark.parametrize("sizes, activation", [([33, 31, 1], "silu"),
                                               pytest.param([70, 0, 100], "gelu",
                                                            marks=pytest.mark.slow)])
def test_fp8_gated_products_match_float64(sizes, activation):
    """The gated FP8 kernel (gate and up from one load of x a step, h = act(gate) * up in the
    epilogue) against float64 of the dequantized operands: gate and up as the FP8 kernel's
    products, h from them; each weight's own scales (of very different sizes, so that one
    taken for the other shows); refusals by name."""
    from jep import fp8

    rng = np.random.default_rng(sum(sizes))
    m, k, n = 200, 256, 256
    group_sizes = jnp.asarray(sizes, jnp.int32)
    x_q, x_scales = fp8.quantize_rows(jnp.asarray(
        rng.normal(size=(m, k)) * np.exp(2 * rng.normal(size=(m, 1))), jnp.float32))
    x64 = np.asarray(fp8.dequantize_rows(x_q, x_scales, jnp.float32), np.float64)
    weights, wants = [], []
    for size in (0.1, 10.0):
        weight = fp8.quantize_weight(jnp.asarray(rng.normal(size=(len(sizes), k, n)) * size,
                                                 jnp.float32))
        weights.append(weight)
        wants.append(numpy_grouped(x64, np.asarray(fp8.dequantize_blocks(
            weight.q, weight.scales, jnp.float32), np.float64), sizes))
    gate, up = wants
    act = {"silu": lambda v: v * 0.5 * (1 + np.tanh(v / 2)),  # v sigmoid(v)
           "gelu": lambda v: 0.5 * v * (1 + np.tanh(0.7978845608028654 * (v + 0.044715 * v**3)))}
    got = mgpu.grouped_matmul_fp8_gated(
        x_q, x_scales, weights[0].q_t, weights[0].scales_t, weights[1].q_t, weights[1].scales_t,
        group_sizes, activation=activation, config=FP8_CONFIG_ACROSS, out_dtype=jnp.float32,
        interpret=not ON_GPU)
    bound = 1e-3 if ON_GPU else 1e-5
    for a, want in zip(got, (act[activation](gate) * up, gate, up)):
        assert a.dtype == jnp.float32 and a.shape == (m, n)
        np.testing.assert_allclose(np.asarray(a, np.float64), want, rtol=bound,
                                   atol=bound * np.abs(want).max())
        assert not np.asarray(a[sum(sizes):]).any()
    args = (x_q, x_scales, weights[0].q_t, weights[0].scales_t)
    with pytest.raises(ValueError, match="across_tiles=True"):
        mgpu.grouped_matmul_fp8_gated(*args, *args[2:], group_sizes, config=FP8_CONFIG_SPLIT_M)
    with pytest.raises(ValueError, match="activation must be one of"):
        mgpu.grouped_matmul_fp8_gated(*args, *args[2:], group_sizes, activation="tanh",
                                      config=FP8_CONFIG_ACROSS)
    with pytest.raises(ValueError, match="w_up must be w_gate's shape"):
        mgpu.grouped_matmul_fp8_gated(*args, weights[0].q_t[:, :128], weights[0].scales_t[:, :1],
                                      group_sizes, config=FP8_CONFIG_ACROSS)


# Two steps of stages: the ring wraps within a group of 200 rows and across tiles; tiles of
# 128 x 64, one epilogue piece a warpgroup.
DW_FP8_SMALL = gm.DwConfig(block_k=128, block_n=64, block_rows=128, max_concurrent_steps=2,
                           warp_specialized=True, epilogue_k=64, epilogue_n=64)


@pytest.mark.parametrize("config, sizes", [
    pytest.param(config, sizes, id=f"sizes{i}-{name}", marks=pytest.mark.slow if slow else ())
    for i, sizes in enumerate([[70, 0, 100], [0, 200, 0], [33, 31, 1], [0, 0, 0]])
    for name, config, slow in (("default", None, False),
                               # the two-stage ring with one group or none: the slow job
                               ("two-stages", DW_FP8_SMALL, i in (1, 3)))])
def test_fp8_weight_gradient_matches_float64_of_its_quantized_operands(config, sizes):
    """grouped_matmul_dw_fp8 against float64 products of x and dy dequantized from
    `jep.fp8.quantize_columns` (a scale per 128 rows of a group x 1 channel): equal to float32
    rounding when interpreted, within the tensor cores' narrower sums inside each 128-row step
    on the GPU (as the FP8 forward kernel). Rows and channels of very different scales, so
    that a scale applied to the wrong rows, channel or step shows; empty groups are zeros and
    the rows past the groups take no part."""
    from jep import fp8

    rng = np.random.default_rng(sum(sizes) + len(sizes))
    m, k, n = 232, 256, 384
    x = jnp.asarray(rng.normal(size=(m, k)) * np.exp(2 * rng.normal(size=(m, 1)))
                    * np.exp(rng.normal(size=(1, k))), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(m, n)) * np.exp(rng.normal(size=(m, 1)))
                     * np.exp(2 * rng.normal(size=(1, n))), jnp.float32)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    x_t, x_scales = fp8.quantize_columns(x, group_sizes)
    dy_t, dy_scales = fp8.quantize_columns(dy, group_sizes)
    dw = gm.grouped_matmul_dw_fp8(x_t, x_scales, dy_t, dy_scales, group_sizes, num_rows=m,
                                  config=config, interpret=not ON_GPU)
    x64, dy64 = (np.asarray(fp8.dequantize_columns(*q, group_sizes, m, jnp.float32), np.float64)
                 for q in ((x_t, x_scales), (dy_t, dy_scales)))
    want = np.zeros((len(sizes), k, n))
    start = 0
    for g, size in enumerate(sizes):
        want[g] = x64[start:start + size].T @ dy64[start:start + size]
        start += size
    assert dw.dtype == jnp.float32 and dw.shape == (len(sizes), k, n)
    bound = 1e-3 if ON_GPU else 1e-5
    np.testing.assert_allclose(np.asarray(dw, np.float64), want, rtol=bound,
                               atol=bound * max(np.abs(want).max(), 1e-30))
    for g, size in enumerate(sizes):
        if size == 0:
            assert not np.asarray(dw[g]).any()
    as_bf16 = gm.grouped_matmul_dw_fp8(x_t, x_scales, dy_t, dy_scales, group_sizes, num_rows=m,
                                       config=config, out_dtype=jnp.bfloat16,
                                       interpret=not ON_GPU)
    assert as_bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(as_bf16, np.float64), want, rtol=1e-2,
                               atol=1e-2 * max(np.abs(want).max(), 1e-30))


@pytest.mark.parametrize("config", [
    None, pytest.param(DW_FP8_SMALL, marks=pytest.mark.slow)], ids=["default", "two-stages"])
def test_fp8_weight_gradients_of_one_x_equal_one_kernel_each(config):
    """Two dy of one x (the gate and up products'): one kernel that loads each step of x once
    for both gives each weight gradient bit for bit as a kernel of its own does; dy of unequal
    shapes are refused."""
    from jep import fp8

    rng = np.random.default_rng(7)
    m, k, n = 232, 256, 384
    group_sizes = jnp.asarray([70, 0, 100], jnp.int32)
    x_t, x_scales = fp8.quantize_columns(jnp.asarray(rng.normal(size=(m, k)), jnp.float32),
                                         group_sizes)
    dys = [fp8.quantize_columns(jnp.asarray(rng.normal(size=(m, n)) * size, jnp.float32),
                                group_sizes) for size in (1.0, 100.0)]
    pair = gm.grouped_matmul_dw_fp8(x_t, x_scales, [d for d, _ in dys], [s for _, s in dys],
                                    group_sizes, num_rows=m, config=config,
                                    interpret=not ON_GPU)
    assert isinstance(pair, tuple) and len(pair) == 2
    for got, (dy_t, dy_scales) in zip(pair, dys):
        alone = gm.grouped_matmul_dw_fp8(x_t, x_scales, dy_t, dy_scales, group_sizes,
                                         num_rows=m, config=config, interpret=not ON_GPU)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(alone))
    assert np.abs(np.asarray(pair[1])).max() > 10 * np.abs(np.asarray(pair[0])).max()
    with pytest.raises(ValueError, match="the dy_t of one shape"):
        gm.grouped_matmul_dw_fp8(x_t, x_scales, [dys[0][0], dys[1][0][:128]],
                                 [dys[0][1], dys[1][1][:, :128]], group_sizes, num_rows=m,
                                 config=config, interpret=True)


def test_fp8_weight_gradient_lowers_and_refuses_what_it_cannot_take():
    """The FP8 weight gradient lowers for Hopper at DeepSeek-V3's expert shapes (32 and 256
    groups of 32768 rows), from any platform, and so do tune's candidates of the gate and up
    weight gradients in one kernel; operands of the wrong layout, dtype or config are refused
    by name."""
    from jep import fp8

    from jep_kernels.grouped_matmul import tuning

    for m, k, n, g in [(32768, 7168, 2048, 32), (32768, 2048, 7168, 256)]:
        p = fp8.padded_rows(m, g)
        spec = jax.ShapeDtypeStruct
        jax.jit(lambda *a, m=m: gm.grouped_matmul_dw_fp8(*a, num_rows=m, out_dtype=jnp.bfloat16)
                ).trace(spec((k, p), fp8.E4M3), spec((p // 128, k), jnp.float32),
                        spec((n, p), fp8.E4M3), spec((p // 128, n), jnp.float32),
                        spec((g,), jnp.int32)).lower(lowering_platforms=("cuda",))
    # The gate and up weight gradients in one kernel at 32 experts, each candidate of tune's.
    m, k, n, g = 32768, 7168, 2048, 32
    p = fp8.padded_rows(m, g)
    dy = (spec((n, p), fp8.E4M3), spec((p // 128, n), jnp.float32))
    for config in tuning.candidates(tuning.DW_FP8_PAIR, k, n):
        jax.jit(lambda x_t, x_s, a, b, c, d, s, config=config: gm.grouped_matmul_dw_fp8(
            x_t, x_s, [a, c], [b, d], s, num_rows=m, config=config, out_dtype=jnp.bfloat16)
                ).trace(spec((k, p), fp8.E4M3), spec((p // 128, k), jnp.float32), *dy, *dy,
                        spec((g,), jnp.int32)).lower(lowering_platforms=("cuda",))
    sizes = jnp.asarray([10, 20], jnp.int32)
    p = fp8.padded_rows(40, 2)
    x_t, x_scales = jnp.zeros((256, p), fp8.E4M3), jnp.zeros((p // 128, 256), jnp.float32)
    dy_t, dy_scales = jnp.zeros((128, p), fp8.E4M3), jnp.zeros((p // 128, 128), jnp.float32)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        gm.grouped_matmul_dw_fp8(x_t.astype(jnp.bfloat16), x_scales, dy_t, dy_scales, sizes,
                                 num_rows=40)
    with pytest.raises(ValueError, match="P=768 columns for 400 rows in 2 groups"):
        gm.grouped_matmul_dw_fp8(x_t, x_scales, dy_t, dy_scales, sizes, num_rows=400)
    with pytest.raises(ValueError, match=r"dy_scales must be float32\[3, 128\]"):
        gm.grouped_matmul_dw_fp8(x_t, x_scales, dy_t, dy_scales[:1], sizes, num_rows=40)
    with pytest.raises(ValueError, match="block_rows=128"):
        gm.grouped_matmul_dw_fp8(x_t, x_scales, dy_t, dy_scales, sizes, num_rows=40,
                                 config=gm.DwConfig(warp_specialized=True))
    with pytest.raises(ValueError, match="epilogue_k a multiple of 64"):
        gm.grouped_matmul_dw_fp8(x_t, x_scales, dy_t, dy_scales, sizes, num_rows=40,
                                 config=gm.DwConfig(block_k=128, block_rows=128, epilogue_k=32,
                                                    warp_specialized=True))
    with pytest.raises(ValueError, match="N=128 of block_n=256"):
        gm.grouped_matmul_dw_fp8(x_t, x_scales, dy_t, dy_scales, sizes, num_rows=40,
                                 config=gm.DwConfig(block_k=128, block_n=256, block_rows=128,
                                                    warp_specialized=True))


def test_fp8_kernel_lowers_for_each_configuration_tuning_times():
    """Every FP8 candidate of `python -m jep.bench tune` (clusters too, which the interpreter
    cannot run) lowers for Hopper at the DeepSeek-V3 expert's two product shapes, from any
    platform, and so do the sum of two products and the gated kernel: a GPU visit then times
    them instead of finding a lowering error."""
    from jep_kernels.grouped_matmul import tuning

    spec, f8 = jax.ShapeDtypeStruct, jnp.float8_e4m3fn
    for m, k, n, g in [(32768, 7168, 2048, 8), (32768, 2048, 7168, 256)]:
        configs = tuning.candidates(tuning.FP8, k, n)
        assert any(c.cluster_n == 2 for c in configs)
        assert any(c.block_m == 256 and c.acc_rows == 64 for c in configs)
        for config in configs:
            jax.jit(lambda *a, config=config: gm.grouped_matmul_fp8(*a, config=config)).trace(
                spec((m, k), f8), spec((m, k // 128), jnp.float32), spec((g, n, k), f8),
                spec((g, n // 128, k // 128), jnp.float32), spec((g,), jnp.int32)).lower(
                lowering_platforms=("cuda",))
    # The gate and up products' dx at 32 experts: a sum of two, the table's config made to sum.
    m, k, n, g = 32768, 2048, 7168, 32
    pair = (spec((m, k), f8), spec((m, k // 128), jnp.float32), spec((g, n, k), f8),
            spec((g, n // 128, k // 128), jnp.float32))
    jax.jit(lambda *a: gm.grouped_matmul_fp8(*([a[i], a[i + 4]] for i in range(4)), a[8])).trace(
        *pair, *pair, spec((g,), jnp.int32)).lower(lowering_platforms=("cuda",))
    # The gate and up products and the activation in one kernel at 32 experts (K 7168, N 2048),
    # each of its candidates.
    m, k, n = 32768, 7168, 2048
    weight = (spec((g, n, k), f8), spec((g, n // 128, k // 128), jnp.float32))
    for config in tuning.candidates(tuning.FP8_GATED, k, n):
        jax.jit(lambda *a, config=config: gm.grouped_matmul_fp8_gated(*a, config=config)).trace(
            spec((m, k), f8), spec((m, k // 128), jnp.float32), *weight, *weight,
            spec((g,), jnp.int32)).lower(lowering_platforms=("cuda",))


def test_fp8_kernel_refuses_what_it_cannot_take():
    f8 = jnp.float8_e4m3fn
    x, x_scales = jnp.zeros((8, 256), f8), jnp.zeros((8, 2), jnp.float32)
    w, w_scales = jnp.zeros((2, 128, 256), f8), jnp.zeros((2, 1, 2), jnp.float32)
    sizes = jnp.zeros(2, jnp.int32)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        gm.grouped_matmul_fp8(x.astype(jnp.bfloat16), x_scales, w, w_scales, sizes)
    with pytest.raises(ValueError, match=r"w_scales must be float32\[2, 1, 2\]"):
        gm.grouped_matmul_fp8(x, x_scales, w, w_scales[:, :, :1], sizes)
    with pytest.raises(ValueError, match=r"x_scales must be float32\[8, 2\]"):
        gm.grouped_matmul_fp8(x, x_scales.T, w, w_scales, sizes)
    with pytest.raises(ValueError, match="must have x's K"):
        gm.grouped_matmul_fp8(x, x_scales, jnp.swapaxes(w, 1, 2), w_scales, sizes)
    with pytest.raises(ValueError, match="block_k=128"):
        gm.grouped_matmul_fp8(x, x_scales, w, w_scales, sizes,
                              config=gm.Config(block_n=64, warp_specialized=True))


def test_shapes_it_cannot_take_raise():
    x = jnp.zeros((8, 128), jnp.bfloat16)
    with pytest.raises(TypeError, match="bf16"):
        gm.grouped_matmul(x.astype(jnp.float32), jnp.zeros((2, 128, 64)), jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match="N=96 of the tile width 64"):
        gm.grouped_matmul(x, jnp.zeros((2, 128, 96), jnp.bfloat16), jnp.zeros(2, jnp.int32),
                          config=CONFIG)
    with pytest.raises(ValueError, match="block_n=32 must be a multiple of 64 for the warp-spe"):
        gm.grouped_matmul(x, jnp.zeros((2, 128, 64), jnp.bfloat16), jnp.zeros(2, jnp.int32),
                          config=gm.Config(block_n=32, warp_specialized=True))
    with pytest.raises(ValueError, match="N=192 of the tile width 256"):  # warp-specialized
        gm.grouped_matmul(x, jnp.zeros((2, 128, 192), jnp.bfloat16), jnp.zeros(2, jnp.int32),
                          config=gm.Config(warp_specialized=True))
    with pytest.raises(ValueError, match="K=64 must be a multiple of the dw_config's block_k=128"):
        gm.grouped_matmul(jnp.zeros((8, 64), jnp.bfloat16), jnp.zeros((2, 64, 128), jnp.bfloat16),
                          jnp.zeros(2, jnp.int32), config=gm.Config(block_n=64))
    with pytest.raises(ValueError, match="group_sizes"):
        gm.grouped_matmul(x, jnp.zeros((2, 128, 64), jnp.bfloat16), jnp.zeros(3, jnp.int32))
    with pytest.raises(TypeError, match="dw_config must be a DwConfig"):  # not forward's tiles
        gm.grouped_matmul(x, jnp.zeros((2, 128, 64), jnp.bfloat16), jnp.zeros(2, jnp.int32),
                          dw_config=CONFIG)
    with pytest.raises(ValueError, match="DwConfig: block_rows=32 and block_n=64 must be"):
        gm.DwConfig(block_rows=32, block_n=64, warp_specialized=True)
    with pytest.raises(ValueError, match="DwConfig.block_k must be an int >= 1"):
        gm.DwConfig(block_k=0)
    with pytest.raises(ValueError, match="resident_steps needs warp_specialized=True"):
        gm.DwConfig(resident_steps=3)
    with pytest.raises(ValueError, match="resident_steps must be 0 or at least 2, got 1"):
        gm.DwConfig(warp_specialized=True, resident_steps=1)
    with pytest.raises(ValueError, match="DwConfig.run_k_blocks must be an int >= 0"):
        gm.DwConfig(warp_specialized=True, resident_steps=2, run_k_blocks=-1)
    with pytest.raises(ValueError, match="K=384 must be a multiple of block_k x run_k_blocks = 256"):
        mgpu.grouped_matmul_dw(jnp.zeros((64, 384), jnp.bfloat16), jnp.zeros((64, 128), jnp.bfloat16),
                               jnp.zeros(2, jnp.int32),
                               config=gm.DwConfig(block_k=128, block_n=64, warp_specialized=True,
                                                  resident_steps=2, run_k_blocks=2))
    with pytest.raises(ValueError, match="across_tiles needs warp_specialized=True and cluster_n=1"):
        gm.Config(across_tiles=True)
    with pytest.raises(ValueError, match="across_tiles needs .* got warp_specialized=True, cluster_n=2"):
        gm.Config(warp_specialized=True, cluster_n=2, across_tiles=True)
    with pytest.raises(ValueError, match="Config.across_tiles must be a bool, got 'yes'"):
        gm.Config(warp_specialized=True, across_tiles="yes")
    with pytest.raises(ValueError, match="split must be 'm' or 'n'"):
        gm.grouped_matmul(x, jnp.zeros((2, 128, 256), jnp.bfloat16), jnp.zeros(2, jnp.int32),
                          config=gm.Config(warp_specialized=True, split="k"))
    with pytest.raises(ValueError, match="split='m' needs block_m a multiple of 128"):
        gm.grouped_matmul(x, jnp.zeros((2, 128, 256), jnp.bfloat16), jnp.zeros(2, jnp.int32),
                          config=gm.Config(block_m=64, warp_specialized=True, split="m"))


def test_inside_shard_map_with_weights_replicated_over_dp():
    # x varies over (dp, ep), w only over ep: the kernels' results must be typed so that the
    # custom_vjp takes them, and dw comes back typed like w. One device (the GPU interpret mode
    # keeps global state: devices must not interpret kernels concurrently); the mesh axes carry
    # the types all the same. 100 rows: not a multiple of the 8 rows TMA wants (the wrapper pads).
    from conftest import P, make_mesh, put

    mesh = make_mesh((1, 1), ("dp", "ep"))
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(1, 100, 128)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(2, 128, 64)) / 10, jnp.bfloat16)
    sizes = put(mesh, np.array([[30, 50]], np.int32), P(("dp", "ep")))
    rows, experts = P(("dp", "ep")), P("ep")

    def loss(matmul):
        mapped = jax.shard_map(lambda x, w, s: matmul(x[0], w, s[0])[None], mesh=mesh,
                               in_specs=(rows, experts, rows), out_specs=rows)
        return lambda x, w: jnp.sum(mapped(x, w, sizes).astype(jnp.float32) ** 2)

    args = (put(mesh, x, rows), put(mesh, w, experts))
    got = jax.jit(jax.value_and_grad(loss(lambda x, w, s: gm.grouped_matmul(
        x, w, s, config=CONFIG, dw_config=DW_SMALL, interpret=not ON_GPU)),
        argnums=(0, 1)))(*args)
    want = jax.jit(jax.value_and_grad(loss(lambda x, w, s: lax.ragged_dot(x, w, s)),
                                      argnums=(0, 1)))(*args)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-3)
    for a, b in zip(got[1], want[1]):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=2e-2, atol=2e-2 * float(np.abs(np.asarray(b, np.float32)).max()))


def test_tuning_table_entries_take_their_shapes_and_defaults_take_multiples_of_128():
    from jep_kernels.grouped_matmul import tuning

    table = tuning._table()
    for name, config in table.items():
        op, *dims = name.split()
        k, n, groups = (int(d.split("=")[1]) for d in dims)
        assert tuning.config_for(op, k, n, groups) == config
        if op in ("dw", tuning.DW_FP8, tuning.DW_FP8_PAIR):  # the weight gradients' configs
            assert isinstance(config, gm.DwConfig)
            assert k % config.block_k == 0 and n % mgpu.dw_tile_n(config) == 0
        else:
            check = jax.ShapeDtypeStruct((8, k), jnp.bfloat16)
            gm.check_shapes(check, jax.ShapeDtypeStruct((groups, k, n), jnp.bfloat16),
                            jax.ShapeDtypeStruct((groups,), jnp.int32), transpose_w=False,
                            config=config)
    for k, n in [(128, 128), (384, 640), (7168, 2048), (1024, 512)]:
        configs = gm.configs_for((4, k, n))  # table entries or defaults; they must take the shape
        assert tuple(f.name for f in dataclasses.fields(configs)) == (*tuning.OPS, tuning.DX_SUM)
        # Where the table has no "dx_sum" for the shape: None (a dx kernel a weight).
        assert configs.dx_sum == tuning.entry_for(tuning.DX_SUM, n, k, 4)
        assert tuning.config_for(tuning.DX_SUM, n, k, 4).across_tiles
        for op in (*tuning.OPS, tuning.DX_SUM):
            pk, pn = tuning.product_shape(op, k, n)
            c = tuning.config_for(op, pk, pn, 4) if op == tuning.DX_SUM else configs[op]
            tile_n = (mgpu.dw_tile_n(c) if op == "dw"
                      else c.block_n * (2 * c.cluster_n if c.warp_specialized else 1))
            assert pn % tile_n == 0 and pk % c.block_k == 0


def _work_items_by_hand(sizes, num_rows, block_m):
    """The work list written out group by group: blocks of block_m rows from the group's first
    row rounded down to a multiple of 8 until its rows are covered, then the pseudo-group of the
    rows past the groups, padded with (-1, 0, 0, 0)."""
    ends = np.minimum(np.cumsum(np.maximum(sizes, 0)), num_rows).tolist() + [num_rows]
    items, start = [], 0
    for group, end in enumerate(ends):
        row = start - start % 8
        while row < end and end > start:
            items.append((group, row, max(start, row), min(end, row + block_m)))
            row += block_m
        start = end
    total = -(-(num_rows + 7 * (len(sizes) + 1)) // block_m) + len(sizes) + 1
    assert len(items) <= total
    return np.array(items + [(-1, 0, 0, 0)] * (total - len(items)), np.int32)


@pytest.mark.parametrize("sizes, num_rows", [
    ([5, 0, 130, 64, 0], 300),  # empty groups, a group over several blocks, a tail of zero rows
    ([0, 0, 0], 70),  # no rows in any group: only the zero pseudo-group
    ([200, 100], 256),  # more rows than there are: clipped
    ([64, 64, 64], 192),  # every boundary on a block boundary
    ([8, 64, 50, 6], 128),  # 64 rows off the block grid: one block from row 8, not two
])
def test_work_items_cover_each_group_from_its_first_row(sizes, num_rows):
    from jep_kernels.grouped_matmul import schedule

    got = jax.jit(schedule.work_items, static_argnums=(1, 2))(jnp.asarray(sizes, jnp.int32),
                                                                num_rows, 64)
    np.testing.assert_array_equal(got, _work_items_by_hand(np.asarray(sizes), num_rows, 64))


def test_work_items_on_random_sizes(rng):
    from jep_kernels.grouped_matmul import schedule

    work_items = jax.jit(schedule.work_items, static_argnums=(1, 2))
    for groups, num_rows in [(1, 63), (7, 500), (33, 901)]:
        for _ in range(6):
            sizes = rng.integers(0, 2 * num_rows // groups + 2, size=groups)
            sizes[rng.random(groups) < 0.3] = 0
            got = work_items(jnp.asarray(sizes, jnp.int32), num_rows, 64)
            np.testing.assert_array_equal(got, _work_items_by_hand(sizes, num_rows, 64))
