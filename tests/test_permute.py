"""The row permutes (jep_kernels.permute): the Pallas kernels against the plain-JAX reference and
float64 numpy. On the CPU they run in Pallas's GPU interpret mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import P, make_mesh, put

import jep
from jep import layout
from jep_kernels import permute
from jep_kernels.permute import mgpu
from jep_kernels.vma import varying

INTERPRET = jax.default_backend() != "gpu"


def numpy_gather_sum(rows, index, weights):
    out = np.zeros((index.shape[0], rows.shape[1]))
    for i, j in np.ndindex(index.shape):
        if 0 <= index[i, j] < rows.shape[0]:
            out[i] += weights[i, j] * rows[index[i, j]]
    return out


def indices(kind, rng, num_rows, shape):
    """Indices into num_rows rows, some out of range on both sides."""
    if kind == "random":
        return rng.integers(-3, num_rows + 3, size=shape)
    if kind == "one_row":  # every output reads the same row
        return np.full(shape, num_rows - 1)
    if kind == "none":  # nothing in range: all zeros
        return rng.choice([-1, num_rows, num_rows + 7], size=shape)
    raise ValueError(kind)


KINDS = ["random", "one_row", "none"]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("kind", KINDS)
def test_gather_is_the_reference_exactly(rng, dtype, kind):
    rows = jnp.asarray(rng.normal(size=(37, 96)), dtype)
    index = jnp.asarray(indices(kind, rng, 37, (53,)), jnp.int32)
    got = permute.gather(rows, index, interpret=INTERPRET)
    want = np.asarray(rows, np.float32)[np.clip(np.asarray(index), 0, 36)]
    want[(np.asarray(index) < 0) | (np.asarray(index) >= 37)] = 0
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(permute.reference.gather(rows, index)))


@pytest.mark.parametrize("dtype, tol, same", [(jnp.bfloat16, 1e-2, 8e-3), (jnp.float32, 1e-5, 1e-6)])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("top_k", [1, 3, 8])
def test_gather_sum_matches_float64_and_the_reference(rng, dtype, tol, same, kind, top_k):
    rows = jnp.asarray(rng.normal(size=(29, 128)), dtype)
    index = indices(kind, rng, 29, (41, top_k))
    weights = rng.random((41, top_k)).astype(np.float32)
    got = permute.gather_sum(rows, jnp.asarray(index, jnp.int32), jnp.asarray(weights),
                             interpret=INTERPRET)
    want = numpy_gather_sum(np.asarray(rows, np.float64), index, weights)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol)
    # Both add in float32 in the order of j and round once; XLA may fuse a multiply-add, so
    # the last bit may differ (one bf16 rounding step at most).
    reference = permute.reference.gather_sum(rows, jnp.asarray(index), jnp.asarray(weights))
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(reference, np.float32),
                               rtol=same, atol=same)


@pytest.mark.parametrize("dtype, hidden", [(jnp.bfloat16, 256), (jnp.float16, 64),
                                           (jnp.float32, 64), (jnp.bfloat16, 7)])
@pytest.mark.parametrize("kind", KINDS)
def test_xla_gathers_are_the_reference(rng, dtype, hidden, kind):
    """jep_kernels.permute.xla (2-byte rows moved as 32-bit words; other rows, and an odd H,
    the reference's way): the gather and the scaled gather bit for bit what the reference
    gives and casts (zero rows where the index is out of range, whatever the scale), the dots those of float64 numpy. The rows hold values that round (scaled
    by random weights), a NaN, an infinity and a negative zero; two scales are NaNs whose low
    bits would carry into the exponent if rounded as numbers."""
    rows = rng.normal(size=(50, hidden)) * 4
    rows[3, :3] = [np.nan, np.inf, -0.0]
    rows = jnp.asarray(rows, dtype)
    index = jnp.asarray(indices(kind, rng, 50, (120,)), jnp.int32)
    scale = rng.normal(size=120).astype(np.float32)
    scale[:2] = np.array([0x7FFFFFFF, 0xFFC00001], np.uint32).view(np.float32)  # NaN payloads
    scale = jnp.asarray(scale)
    want = permute.reference.gather(rows, index)
    np.testing.assert_array_equal(np.asarray(permute.xla.gather(rows, index), np.float32),
                                  np.asarray(want, np.float32))
    valid = ((index >= 0) & (index < 50))[:, None]
    want_scaled = jnp.where(valid, want.astype(jnp.float32) * scale[:, None], 0).astype(dtype)
    np.testing.assert_array_equal(
        np.asarray(permute.xla.gather_scaled(rows, index, scale), np.float32),
        np.asarray(want_scaled, np.float32))
    finite = jnp.where(jnp.isfinite(rows), rows, 1).astype(dtype)
    pairs = jnp.asarray(indices(kind, rng, 50, (120, 3)), jnp.int32)
    other = jnp.asarray(rng.normal(size=(120, hidden)), dtype)
    dots = permute.xla.gather_dots(finite, pairs, other)
    r64, o64, p = np.asarray(finite, np.float64), np.asarray(other, np.float64), np.asarray(pairs)
    want_dots = np.where((p >= 0) & (p < 50), np.einsum("ijh,ih->ij", r64[np.clip(p, 0, 49)], o64), 0)
    assert dots.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(dots), want_dots, rtol=1e-5, atol=1e-5 * hidden)


def test_gather_sum_without_weights_adds_the_rows(rng):
    rows = jnp.asarray(rng.normal(size=(16, 128)), jnp.float32)
    index = rng.integers(-1, 16, size=(10, 4))
    got = permute.gather_sum(rows, jnp.asarray(index), interpret=INTERPRET)
    np.testing.assert_allclose(got, numpy_gather_sum(np.asarray(rows), index, np.ones(index.shape)),
                               rtol=1e-5, atol=1e-5)


def test_rows_wider_than_a_piece_go_in_pieces(rng):
    """A row of 512 floats in pieces of 128: each output row is stitched from four copies."""
    rows = jnp.asarray(rng.normal(size=(9, 512)), jnp.float32)
    index = jnp.asarray(rng.integers(-1, 9, size=(11,)), jnp.int32)
    got = mgpu.gather(rows, permute._valid(index, 9), width=128, stages=3, interpret=INTERPRET)
    np.testing.assert_array_equal(got, permute.reference.gather(rows, index))
    index2 = jnp.asarray(rng.integers(-1, 9, size=(11, 2)), jnp.int32)
    weights = jnp.asarray(rng.random((11, 2)), jnp.float32)
    got = mgpu.gather_sum(rows, permute._valid(index2, 9), weights, width=128, ring=3,
                          interpret=INTERPRET)
    np.testing.assert_allclose(got, permute.reference.gather_sum(rows, index2, weights),
                               rtol=1e-6, atol=1e-6)


def test_piece_width_divides_the_row_in_whole_16_byte_units():
    assert permute._piece_width(7168, 2, 16384) == 7168  # 14 KiB: one piece
    assert permute._piece_width(7168, 2, 4096) == 1792
    assert permute._piece_width(16384, 4, 16384) == 4096
    assert permute._piece_width(24, 2, 16) == 8
    assert permute._piece_width(7168, 2, 16384, 128) == 7168
    assert permute._piece_width(1536, 4, 4096, 128) == 768  # 3 KiB: 1 KiB pieces do not divide


def test_empty_rows_or_indices_give_zeros_or_nothing():
    rows = jnp.zeros((0, 16), jnp.float32)
    assert not permute.gather(rows, jnp.arange(3), interpret=INTERPRET).any()
    some = jnp.ones((4, 16), jnp.float32)
    assert permute.gather(some, jnp.zeros((0,), jnp.int32), interpret=INTERPRET).shape == (0, 16)
    assert not permute.gather_sum(jnp.zeros((0, 128)), jnp.zeros((3, 2), jnp.int32),
                                  interpret=INTERPRET).any()


@pytest.mark.parametrize("call, match", [
    (lambda: permute.gather(jnp.zeros((4, 3), jnp.float32), jnp.arange(2)), "multiple of 16"),
    (lambda: permute.gather(jnp.zeros((4, 16), jnp.int8), jnp.arange(2)), "2- or 4-byte"),
    (lambda: permute.gather(jnp.zeros((4, 16), jnp.float32), jnp.zeros((2, 2), jnp.int32)),
     "index must be an integer array of rank 1"),
    (lambda: permute.gather_sum(jnp.zeros((4, 128), jnp.float32), jnp.zeros((2, 2), jnp.int32),
                                jnp.zeros((2, 3))), "weights must have index's shape"),
    (lambda: permute.gather_sum(jnp.zeros((4, 16), jnp.float32), jnp.zeros((2, 2), jnp.int32)),
     "H a multiple of 128"),
    (lambda: layout.take_rows(jnp.zeros((4, 16)), jnp.arange(2), "triton"), "permute must be one of"),
    (lambda: jep.DispatchConfig(permute="triton"), "permute must be one of"),
])
def test_bad_input_raises_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the CPU's answer")
def test_pallas_permute_off_hopper_raises_naming_the_fallback():
    with pytest.raises(ValueError, match="Use 'xla' or 'auto'"):
        layout.take_rows(jnp.zeros((4, 16)), jnp.arange(2), "pallas")
    assert layout.resolve_permute("auto", jnp.zeros((4, 4096))) == "xla"


def test_each_permute_resolves_to_its_mover_on_hopper(monkeypatch):
    # As on an H200: "xla" stays XLA's whatever the rows, "pallas" takes the kernels, "auto"
    # the gather kernel for rows of 8 KiB or more and XLA's sums.
    monkeypatch.setattr(layout, "on_hopper", lambda: True)
    wide, narrow = jnp.zeros((4, 4096), jnp.bfloat16), jnp.zeros((4, 256), jnp.bfloat16)
    for rows in (wide, narrow):
        assert layout.resolve_permute("xla", rows) == "xla"
        assert layout.resolve_permute("xla", rows, "gather_sum") == "xla"
        assert layout.resolve_permute("pallas", rows) == "pallas"
        assert layout.resolve_permute("pallas", rows, "gather_sum") == "pallas"
        assert layout.resolve_permute("auto", rows, "gather_sum") == "xla"
    assert layout.resolve_permute("auto", wide) == "pallas"
    assert layout.resolve_permute("auto", narrow) == "xla"
    assert layout.resolve_permute("auto", jnp.zeros((4, 4096), jnp.int32)) == "xla"


@pytest.mark.parametrize("dtype, hidden", [(jnp.bfloat16, 7168), (jnp.float32, 384)])
def test_kernels_lower_for_hopper(dtype, hidden):
    """Lowered for CUDA (no GPU needed): Mosaic GPU's layout inference and the copies' shapes
    are checked here, which the interpret mode does not do."""
    rows = jax.ShapeDtypeStruct((300, hidden), dtype)
    index = jax.ShapeDtypeStruct((500,), jnp.int32)
    pairs = jax.ShapeDtypeStruct((500, 8), jnp.int32)
    weights = jax.ShapeDtypeStruct((500, 8), jnp.float32)
    jax.export.export(jax.jit(permute.gather), platforms=["cuda"])(rows, index)
    jax.export.export(jax.jit(permute.gather_sum), platforms=["cuda"])(rows, pairs, weights)


def test_inside_shard_map_results_vary_like_their_rows(rng):
    """Under shard_map the kernels' results are typed as varying over the axes their inputs
    vary over (custom_vjp rules of dispatch and combine compare these types). One device: the
    GPU interpret mode keeps global state, so devices must not interpret kernels concurrently;
    the mesh axis carries the types all the same."""
    mesh = make_mesh((1,), ("ep",))
    rows = rng.normal(size=(8, 128)).astype(np.float32)
    index = rng.integers(-1, 8, size=(5, 3)).astype(np.int32)

    def local(rows, index):
        gathered = permute.gather(rows, index[:, 0], interpret=INTERPRET)
        summed = permute.gather_sum(rows, index, interpret=INTERPRET)
        assert "ep" in varying(gathered) and "ep" in varying(summed)
        return gathered, summed

    gathered, summed = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("ep"), P("ep")),
                                             out_specs=(P("ep"), P("ep"))))(
        put(mesh, rows, P("ep")), put(mesh, index, P("ep")))
    np.testing.assert_array_equal(gathered, permute.reference.gather(rows, index[:, 0]))
    np.testing.assert_allclose(summed, permute.reference.gather_sum(rows, index),
                               rtol=1e-6, atol=1e-6)
