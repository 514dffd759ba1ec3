"""jep.low_latency against the loop references in `jep.reference` and against jep.dispatch /
jep.combine, on random and skewed routings, every EP size, with and without a capacity."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import P, make_mesh, put
from routings import CALLER_KINDS, KINDS, make_routing

import jep
from jep import low_latency, reference
from jep_kernels import ragged_a2a

pytestmark = pytest.mark.skipif("ffi" not in jep.transport.available(),
                                reason="the low-latency calls run where the ffi transport runs")


@functools.lru_cache(maxsize=None)
def low_latency_fn(num_ranks, num_experts, capacity, calls=1):
    """jit(shard_map) of low-latency dispatch + combine, with jep.dispatch + jep.combine beside
    them, for global [n, T, ...] arrays. With calls > 1 the pair runs that many times in a loop
    (the same buffers reused), each time on x + the loop index."""
    mesh = make_mesh((num_ranks,), ("ep",))

    def local(x, ids, y, weights):
        def step(i, _):
            recv_x, sizes, handle = low_latency.dispatch(
                x[0] + i, ids[0], weights[0], num_experts=num_experts, axis_name="ep",
                capacity=capacity, mesh=mesh)
            out = low_latency.combine(y[0] + recv_x, handle)
            return i + 1, (recv_x, sizes, handle.num_dropped, out)

        _, (recv_x, sizes, dropped, out) = jax.lax.scan(step, 0, None, length=calls)
        want_x, want_sizes, handle = jep.dispatch(
            x[0] + (calls - 1), ids[0], num_experts=num_experts, axis_name="ep", capacity=capacity,
            backend="reference")
        want_out = jep.combine(y[0] + want_x, handle, weights[0])
        return tuple(a[None] for a in (recv_x, sizes, dropped, out, want_x, want_sizes,
                                       handle.num_dropped, want_out))

    spec = P("ep")
    mapped = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 4, out_specs=(spec,) * 8))
    return lambda *args: mapped(*(put(mesh, a, spec) for a in args))


def check(rng, ids, *, num_experts, capacity, hidden=5, calls=1, dtype=np.float32):
    num_ranks, num_tokens, top_k = ids.shape
    x = rng.normal(size=(num_ranks, num_tokens, hidden)).astype(dtype)
    weights = rng.random(ids.shape).astype(np.float32)
    want_x, want_sizes, owner, want_dropped = reference.dispatch(
        x + (calls - 1), ids, num_experts=num_experts, capacity=capacity)
    y = rng.normal(size=want_x.shape).astype(dtype)
    (recv_x, sizes, dropped, out, jep_x, jep_sizes, jep_dropped, jep_out) = (
        np.asarray(a) for a in low_latency_fn(num_ranks, num_experts, capacity, calls)(
            x, ids, y, weights))
    for call in range(calls):  # every call of the loop, on its own input
        step_x, _, _, _ = reference.dispatch(x + call, ids, num_experts=num_experts,
                                             capacity=capacity)
        np.testing.assert_array_equal(recv_x[:, call], step_x)  # a permutation: exact
        np.testing.assert_array_equal(sizes[:, call], want_sizes)
        np.testing.assert_array_equal(dropped[:, call], want_dropped)
    last = calls - 1
    np.testing.assert_array_equal(recv_x[:, last], jep_x)
    np.testing.assert_array_equal(dropped[:, last], jep_dropped)
    tolerance = 1e-2 if dtype != np.float32 else 1e-5
    want_out = reference.combine((y + want_x).astype(np.float64), owner, weights, ids)
    np.testing.assert_allclose(out[:, last].astype(np.float64), want_out, rtol=tolerance,
                               atol=tolerance)
    # The same sums in the same order as jep.combine; only the rounding of each weighted term
    # may differ (a fused multiply-add here).
    np.testing.assert_allclose(out[:, last].astype(np.float32), jep_out.astype(np.float32),
                               rtol=1e-6 if dtype == np.float32 else 1e-2, atol=1e-6)


@pytest.mark.parametrize("num_ranks", [1, 2, 4, 8])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference_and_dispatch(rng, num_ranks, kind):
    num_experts = 2 * num_ranks
    ids = make_routing(kind, rng, num_ranks=num_ranks, num_tokens=6, top_k=2,
                       num_experts=num_experts)
    check(rng, ids, num_experts=num_experts, capacity=None)


@pytest.mark.parametrize("num_ranks", [1, 4])
@pytest.mark.parametrize("kind", CALLER_KINDS)
def test_repeated_experts_are_sent_once_and_ids_past_e_nowhere(rng, num_ranks, kind):
    num_experts = 2 * num_ranks  # k = 4 slots over 2 experts a rank
    ids = make_routing(kind, rng, num_ranks=num_ranks, num_tokens=6, top_k=4,
                       num_experts=num_experts)
    check(rng, ids, num_experts=num_experts, capacity=None)


@pytest.mark.parametrize("capacity", [0, 1, 3, 100])
@pytest.mark.parametrize("kind", ["random", "one_expert"])
def test_capacity_drops_are_counted_exactly(rng, capacity, kind):
    num_ranks, num_experts = 4, 8
    ids = make_routing(kind, rng, num_ranks=num_ranks, num_tokens=5, top_k=3,
                       num_experts=num_experts)
    check(rng, ids, num_experts=num_experts, capacity=capacity)


def test_buffers_are_reused_across_calls(rng):
    """The same call site, run four times in a loop: every call gives its own input's rows."""
    ids = make_routing("random", rng, num_ranks=4, num_tokens=7, top_k=4, num_experts=16)
    check(rng, ids, num_experts=16, capacity=None, calls=4)


def _device_free_bytes():
    """Free memory of GPU 0 as CUDA counts it (cudaMalloc'd buffers included), or None."""
    if jax.default_backend() != "gpu":
        return None
    ragged_a2a.register("gpu")
    return ragged_a2a.device_free_bytes(0)


def test_buffers_belong_to_their_owner_and_are_freed_on_release(rng):
    """New traces of the same shapes reuse their owner's buffers: the sets live are one per
    device, direction and shape however often the pair is traced, and none after release."""
    num_ranks = min(4, jax.device_count())
    mesh = make_mesh((num_ranks,), ("ep",))
    buffer = low_latency.Buffer()
    shapes = [(4, 8), (8, 8), (4, 16)]  # (tokens, hidden) per rank

    def program(buffer):
        def local(x, ids, weights):
            recv_x, _, handle = low_latency.dispatch(
                x, ids, weights, num_experts=2 * num_ranks, axis_name="ep", mesh=mesh,
                buffer=buffer)
            return low_latency.combine(recv_x, handle)
        # A new function each time: a new trace and a new compile.
        return jax.jit(jax.shard_map(lambda *a: local(*a), mesh=mesh, in_specs=(P("ep"),) * 3,
                                     out_specs=P("ep")))

    for _ in range(3):
        for tokens, hidden in shapes:
            x = rng.normal(size=(num_ranks * tokens, hidden)).astype(np.float32)
            ids = rng.integers(0, 2 * num_ranks, size=(num_ranks * tokens, 2)).astype(np.int32)
            ids[:, 1] = (ids[:, 0] + 1) % (2 * num_ranks)
            weights = rng.random(ids.shape).astype(np.float32)
            out = program(buffer)(*(put(mesh, a, P("ep")) for a in (x, ids, weights)))
            np.testing.assert_allclose(np.asarray(out), x * weights.sum(1, keepdims=True),
                                       rtol=1e-5, atol=1e-6)
    sets, nbytes = buffer.live()
    assert sets == 2 * len(shapes) * num_ranks, sets
    assert nbytes > 0 if jax.default_backend() == "gpu" else nbytes == 0
    stale = program(buffer)
    args = [put(mesh, a, P("ep")) for a in (np.ones((num_ranks * 4, 8), np.float32),
                                             np.zeros((num_ranks * 4, 2), np.int32),
                                             np.ones((num_ranks * 4, 2), np.float32))]
    compiled = stale.lower(*args).compile()  # traced before the release

    buffer.release()
    assert buffer.live() == (0, 0)
    with pytest.raises(ValueError, match="released"):
        program(buffer)(*args)
    with pytest.raises(Exception, match="released"):
        jax.block_until_ready(compiled(*args))
    assert buffer.live() == (0, 0)
    # A fresh buffer runs (and its run replaces the failed one's effect tokens).
    fresh = low_latency.Buffer()
    jax.block_until_ready(program(fresh)(*args))
    jax.effects_barrier()
    fresh.release()


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="a GPU's memory")
def test_released_buffers_give_their_device_memory_back(rng):
    num_ranks = min(4, jax.device_count())
    mesh = make_mesh((num_ranks,), ("ep",))
    buffer = low_latency.Buffer()
    tokens, hidden = 512, 8192  # 16 MiB of rows a rank, each way: whole pages of their own

    def local(x, ids, weights):
        recv_x, _, handle = low_latency.dispatch(x, ids, weights, num_experts=num_ranks,
                                                 axis_name="ep", mesh=mesh, buffer=buffer)
        return low_latency.combine(recv_x, handle)

    ids = np.zeros((num_ranks * tokens, 1), np.int32)
    args = [put(mesh, a, P("ep")) for a in (np.ones((num_ranks * tokens, hidden), np.float32),
                                             ids, np.ones(ids.shape, np.float32))]
    program = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("ep"),) * 3,
                                    out_specs=P("ep")))
    program.lower(*args).compile()
    free_before = _device_free_bytes()
    jax.block_until_ready(program(*args))
    sets, nbytes = buffer.live()
    free_with = _device_free_bytes()
    buffer.release()
    free_after = _device_free_bytes()
    assert sets == 2 * num_ranks and nbytes >= 2 * num_ranks * tokens * hidden * 4
    # XLA's pool may grow as well (never shrink) while the program runs: the buffers are the
    # least the free memory fell by, and all of it comes back.
    assert free_before - free_with >= nbytes, (free_before, free_with, nbytes)
    assert free_after - free_with >= nbytes, (free_with, free_after, nbytes)


def test_the_default_buffer_is_one_until_released():
    first = low_latency.default_buffer()
    assert low_latency.default_buffer() is first
    first.release()
    first.release()  # idempotent
    second = low_latency.default_buffer()
    assert second is not first and not second.released and first.released
    with pytest.raises(TypeError, match="buffer must be"):
        mesh = make_mesh((min(2, jax.device_count()),), ("ep",))
        jax.shard_map(lambda x, i, w: low_latency.dispatch(
            x, i, w, num_experts=4, axis_name="ep", mesh=mesh, buffer="mine")[0],
            mesh=mesh, in_specs=P(), out_specs=P())(
            np.ones((4, 8), np.float32), np.zeros((4, 2), np.int32), np.ones((4, 2), np.float32))


def test_bfloat16_with_many_experts_per_rank(rng):
    ids = make_routing("random", rng, num_ranks=2, num_tokens=9, top_k=8, num_experts=32)
    check(rng, ids, num_experts=32, capacity=None, hidden=128, dtype=jnp.bfloat16)


def test_device_coords_follow_the_mesh():
    mesh = make_mesh((2, 4), ("dp", "ep"))
    groups, ranks = low_latency.device_coords(mesh, "ep")
    for index in np.ndindex(mesh.devices.shape):
        ordinal = mesh.devices[index].local_hardware_id
        if ordinal is None:
            ordinal = mesh.devices[index].id
        assert (groups[ordinal], ranks[ordinal]) == index


def test_gradient_raises():
    mesh = make_mesh((2,), ("ep",))

    def loss(x, ids, weights):
        def local(x, ids, weights):
            recv_x, _, handle = low_latency.dispatch(x, ids, weights, num_experts=4,
                                                     axis_name="ep", mesh=mesh)
            return low_latency.combine(recv_x, handle).sum()[None]
        return jax.shard_map(local, mesh=mesh, in_specs=(P("ep"),) * 3,
                             out_specs=P("ep"))(x, ids, weights).sum()

    x = put(mesh, np.ones((4, 8), np.float32), P("ep"))
    ids = put(mesh, np.zeros((4, 2), np.int32) + [0, 3], P("ep"))
    weights = put(mesh, np.ones((4, 2), np.float32), P("ep"))
    with pytest.raises(ValueError, match="forward only"):
        jax.jit(jax.grad(loss))(x, ids, weights)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(num_experts=6), ValueError, "divisible"),
    (dict(num_experts=4, capacity=-1), ValueError, "capacity"),
    (dict(num_experts=4, weights=np.ones((4, 3), np.float32)), ValueError, "weights"),
])
def test_bad_input_raises_at_trace_time(kwargs, error, match):
    mesh = make_mesh((4,), ("ep",))
    weights = kwargs.pop("weights", np.ones((4, 2), np.float32))

    def local(x, ids, weights):
        return low_latency.dispatch(x, ids, weights, axis_name="ep", mesh=mesh, **kwargs)[0]

    with pytest.raises(error, match=match):
        jax.shard_map(local, mesh=mesh, in_specs=P(), out_specs=P())(
            np.ones((4, 8), np.float32), np.zeros((4, 2), np.int32), weights)


@pytest.mark.parametrize("num_ranks", [1, 4])
def test_fp8_dispatch_equals_one_of_the_dequantized_tokens(rng, num_ranks):
    mesh = make_mesh((num_ranks,), ("ep",))
    num_experts, tokens, hidden = 2 * num_ranks, 5, 256
    ids = make_routing("random", rng, num_ranks=num_ranks, num_tokens=tokens, top_k=2,
                       num_experts=num_experts).reshape(num_ranks * tokens, 2)
    x = jnp.asarray(rng.normal(size=(num_ranks * tokens, hidden)) * 30, jnp.bfloat16)
    weights = jnp.asarray(rng.random(ids.shape), jnp.float32)

    def local(x, ids, weights):
        def run(x, fp8):
            recv_x, _, handle = low_latency.dispatch(x, ids, weights, num_experts=num_experts,
                                                     axis_name="ep", mesh=mesh, fp8=fp8)
            return recv_x, low_latency.combine(recv_x, handle)
        home = jep.fp8.dequantize_rows(*jep.fp8.quantize_rows(x), x.dtype)
        return (*run(x, True), *run(home, False))

    spec = P("ep")
    got_x, got_out, want_x, want_out = jax.jit(jax.shard_map(
        local, mesh=mesh, in_specs=(spec,) * 3, out_specs=(spec,) * 4))(
        *(put(mesh, a, spec) for a in (x, ids, weights)))
    assert got_x.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got_x, np.float32), np.asarray(want_x, np.float32))
    np.testing.assert_array_equal(np.asarray(got_out, np.float32),
                                  np.asarray(want_out, np.float32))
