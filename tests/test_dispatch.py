"""dispatch / combine against the loop references in `jep.reference`, forward and backward."""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import P, counting_compiles, make_mesh, put
from routings import CALLER_KINDS, KINDS, make_routing

import jep
from jep import reference

BACKENDS = jep.transport.available()
HIDDEN = 5


@functools.lru_cache(maxsize=None)
def dispatch_fn(num_ranks, num_experts, capacity, backend, permute="auto"):
    """jit(shard_map) of dispatch + combine and of their vjps, for global [n, T, ...] arrays."""
    mesh = make_mesh((num_ranks,), ("ep",))

    def local(x, ids, y, weights):
        recv_x, group_sizes, handle = jep.dispatch(
            x[0], ids[0], num_experts=num_experts, axis_name="ep", capacity=capacity, backend=backend,
            permute=permute)
        out = jep.combine(y[0], handle, weights[0])
        return (recv_x[None], group_sizes[None], handle.num_dropped[None], out[None],
                handle.num_invalid_ids[None])

    spec = P("ep")
    mapped = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 4, out_specs=(spec,) * 5)

    def run(x, ids, y, weights, g_recv, g_out):
        (recv_x, group_sizes, dropped, out, invalid), vjp = jax.vjp(
            lambda x, y, w: mapped(x, ids, y, w), x, y, weights)
        zeros = (jnp.zeros(group_sizes.shape, jax.dtypes.float0),
                 jnp.zeros(dropped.shape, jax.dtypes.float0))
        grads = vjp((g_recv,) + zeros + (g_out, jnp.zeros(invalid.shape, jax.dtypes.float0)))
        return recv_x, group_sizes, dropped, out, invalid, grads

    jitted = jax.jit(run)
    return lambda *args: jitted(*(put(mesh, a, spec) for a in args))


def check_against_reference(rng, ids, *, num_experts, capacity, backend, permute="auto",
                            hidden=HIDDEN):
    num_ranks, num_tokens, top_k = ids.shape
    x = rng.normal(size=(num_ranks, num_tokens, hidden)).astype(np.float32)
    weights = rng.random(ids.shape).astype(np.float32)
    want_x, want_sizes, owner, want_dropped = reference.dispatch(
        x, ids, num_experts=num_experts, capacity=capacity)
    y = rng.normal(size=want_x.shape).astype(np.float32)
    g_recv = rng.normal(size=want_x.shape).astype(np.float32)
    g_out = rng.normal(size=x.shape).astype(np.float32)

    recv_x, group_sizes, dropped, out, invalid, (dx, dy, dw) = dispatch_fn(
        num_ranks, num_experts, capacity, backend, permute)(x, ids, y, weights, g_recv, g_out)

    np.testing.assert_array_equal(recv_x, want_x)  # a permutation: exact
    np.testing.assert_array_equal(group_sizes, want_sizes)
    np.testing.assert_array_equal(dropped, want_dropped)
    np.testing.assert_array_equal(invalid, (ids >= num_experts).sum(axis=(1, 2)))
    np.testing.assert_allclose(out, reference.combine(y, owner, weights, ids), rtol=1e-5, atol=1e-5)
    # Backward of dispatch: the unweighted combine of the cotangent.
    np.testing.assert_allclose(dx, reference.combine(g_recv, owner, np.ones_like(weights)),
                               rtol=1e-5, atol=1e-5)
    # Backward of combine: dy = the output cotangent dispatched, times each row's weight (the
    # sum of the slots naming its expert); dweights[t, j] = <g_out[t], y[row of (t, j)]>, the
    # row of an expert's first slot for each of its slots.
    want_dy = np.zeros_like(y)
    want_dw = np.zeros_like(weights)
    for rank, row in zip(*np.nonzero(owner[..., 0] >= 0)):
        source, token, slot = owner[rank, row]
        same = ids[source, token] == ids[source, token, slot]
        want_dy[rank, row] = weights[source, token][same].sum() * g_out[source, token]
        want_dw[source, token, same] = g_out[source, token] @ y[rank, row]
    np.testing.assert_allclose(dy, want_dy, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_ranks", [1, 2, 4, 8])
@pytest.mark.parametrize("kind", KINDS)
def test_dispatch_and_combine_match_reference_forward_and_backward(rng, backend, num_ranks, kind):
    num_experts = 2 * num_ranks
    ids = make_routing(kind, rng, num_ranks=num_ranks, num_tokens=6, top_k=2, num_experts=num_experts)
    check_against_reference(rng, ids, num_experts=num_experts, capacity=None, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_ranks", [1, pytest.param(2, marks=pytest.mark.slow), 4])
@pytest.mark.parametrize("capacity", [None, pytest.param(1, marks=pytest.mark.slow)])
@pytest.mark.parametrize("kind", CALLER_KINDS)
def test_repeated_experts_share_a_row_and_ids_past_e_are_counted(rng, backend, num_ranks,
                                                                 capacity, kind):
    # k = 4 slots over 2 experts a rank: unmerged, repeats would overflow the dropless buffer.
    num_experts = 2 * num_ranks
    ids = make_routing(kind, rng, num_ranks=num_ranks, num_tokens=6, top_k=4,
                       num_experts=num_experts)
    check_against_reference(rng, ids, num_experts=num_experts, capacity=capacity, backend=backend)


def test_ids_past_e_are_an_error_under_checkify():
    from jax.experimental import checkify
    mesh = make_mesh((2,), ("ep",), explicit=False)  # checkify of shard_map: auto axes

    def local(x, ids):
        recv_x, _, _ = jep.dispatch(x, ids, num_experts=4, axis_name="ep", check_ids=True)
        return recv_x

    run = jax.jit(checkify.checkify(jax.shard_map(local, mesh=mesh, in_specs=(P("ep"), P("ep")),
                                                  out_specs=P("ep"))))
    x = put(mesh, np.ones((8, 3), np.float32), P("ep"))
    error, _ = run(x, put(mesh, np.full((8, 2), 3, np.int32), P("ep")))
    error.throw()  # ids in range: no error
    error, _ = run(x, put(mesh, np.full((8, 2), 4, np.int32), P("ep")))
    with pytest.raises(checkify.JaxRuntimeError, match="8 expert ids >= num_experts=4"):
        error.throw()


def test_a_step_has_no_effects_unless_ids_are_checked():
    """Without check_ids a jitted layer step holds no effect, so jax dispatches its calls on the
    fast C++ path; the invalid ids are still counted."""
    mesh = make_mesh((2,), ("ep",), explicit=False)

    def local(x, ids, check_ids):
        _, _, handle = jep.dispatch(x, ids, num_experts=4, axis_name="ep", check_ids=check_ids)
        return handle.num_invalid_ids[None]

    x = put(mesh, np.ones((8, 3), np.float32), P("ep"))
    ids = put(mesh, np.full((8, 2), 4, np.int32), P("ep"))
    for check_ids in (False, True):
        run = jax.jit(jax.shard_map(functools.partial(local, check_ids=check_ids), mesh=mesh,
                                    in_specs=(P("ep"), P("ep")), out_specs=P("ep")))
        assert bool(jax.make_jaxpr(run)(x, ids).effects) == check_ids
    np.testing.assert_array_equal(run(x, ids), [8, 8])

    config = jep.MoEConfig(num_experts=4, top_k=2, axis_name="ep")
    params = jep.init_params(jax.random.key(0), hidden=3, ffn=4, config=config)
    step = jax.grad(lambda p: jnp.sum(jep.moe(x, p, config=config, mesh=mesh)[0]))
    assert not jax.make_jaxpr(step)(params).effects
    with pytest.raises(TypeError, match="check_ids must be a bool"):
        jep.DispatchConfig(check_ids=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("capacity", [0, 1, 3, 100])
@pytest.mark.parametrize("kind", ["random", "one_expert"])
def test_capacity_drops_are_counted_exactly(rng, backend, capacity, kind):
    num_ranks, num_experts = 4, 8
    ids = make_routing(kind, rng, num_ranks=num_ranks, num_tokens=5, top_k=3, num_experts=num_experts)
    check_against_reference(rng, ids, num_experts=num_experts, capacity=capacity, backend=backend)


@pytest.mark.skipif(not jep.platform.on_hopper(), reason="the Pallas permutes run on Hopper GPUs")
@pytest.mark.parametrize("capacity", [None, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_pallas_permutes_match_reference(rng, kind, capacity):
    """The expansion and the sums of dispatch and combine by jep_kernels.permute (rows of 128
    floats), on every GPU there is."""
    num_ranks = len(jax.devices())
    num_experts = 2 * num_ranks
    ids = make_routing(kind, rng, num_ranks=num_ranks, num_tokens=6, top_k=2, num_experts=num_experts)
    check_against_reference(rng, ids, num_experts=num_experts, capacity=capacity,
                            backend="auto", permute="pallas", hidden=128)


@pytest.mark.parametrize("num_ranks", [1, 2, 8])
def test_dispatch_then_combine_is_identity_when_k1(rng, num_ranks):
    num_experts = 3 * num_ranks
    ids = make_routing("random", rng, num_ranks=num_ranks, num_tokens=7, top_k=1, num_experts=num_experts)
    x = rng.normal(size=(num_ranks, 7, HIDDEN)).astype(np.float32)
    mesh = make_mesh((num_ranks,), ("ep",))

    def local(x, ids):
        recv_x, _, handle = jep.dispatch(x[0], ids[0], num_experts=num_experts, axis_name="ep")
        return jep.combine(recv_x, handle, jnp.ones(ids[0].shape))[None]

    out = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("ep"),) * 2, out_specs=P("ep")))(
        put(mesh, x, P("ep")), put(mesh, ids, P("ep")))
    np.testing.assert_array_equal(out, x)


def test_token_crosses_to_a_rank_once_even_with_several_experts_there(rng):
    # Every token picks experts 0 and 1, both on rank 0: rank 0 receives T rows per source, and
    # expands them to 2T; the layout counts one row per (token, rank).
    num_ranks, num_tokens = 2, 4
    ids = np.broadcast_to(np.array([0, 1], np.int32), (num_ranks, num_tokens, 2))
    layout = jep.layout.get_dispatch_layout(jnp.asarray(ids[0]), num_experts=4, num_ranks=num_ranks)
    np.testing.assert_array_equal(layout.tokens_per_rank, [num_tokens, 0])
    check_against_reference(rng, np.ascontiguousarray(ids), num_experts=4, capacity=None,
                            backend=BACKENDS[0])


@hypothesis.settings(max_examples=30, deadline=None, derandomize=False)
@hypothesis.given(
    num_ranks=st.sampled_from([1, 2, 4, 8]),
    capacity=st.sampled_from([None, 0, 2, 5]),
    data=st.data(),
)
def test_hypothesis_random_routings_match_reference(num_ranks, capacity, data):
    num_tokens, top_k, num_experts = 4, 2, 2 * num_ranks
    # Any ids in [-1, E], repeats within a token included: out-of-range ids are empty slots.
    ids = data.draw(st.lists(st.integers(-1, num_experts), min_size=num_ranks * num_tokens * top_k,
                             max_size=num_ranks * num_tokens * top_k))
    ids = np.array(ids, np.int32).reshape(num_ranks, num_tokens, top_k)
    seed = data.draw(st.integers(0, 2**31 - 1))
    check_against_reference(np.random.default_rng(seed), ids, num_experts=num_experts,
                            capacity=capacity, backend=BACKENDS[0])


# --- bad input ------------------------------------------------------------------------------

def run_local(fn, num_ranks=2):
    mesh = make_mesh((num_ranks,), ("ep",))
    return jax.shard_map(fn, mesh=mesh, in_specs=(), out_specs=P())()


def test_dispatch_outside_shard_map_raises():
    with pytest.raises(ValueError, match="inside jax.shard_map"):
        jep.dispatch(jnp.zeros((4, 3)), jnp.zeros((4, 1), jnp.int32), num_experts=2, axis_name="ep")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(num_experts=3), ValueError, "divisible"),
    (dict(num_experts=0), ValueError, "num_experts"),
    (dict(capacity=-1), ValueError, "capacity"),
    (dict(capacity=1.5), ValueError, "capacity"),
    (dict(x=jnp.zeros((4,))), ValueError, "x must have rank 2"),
    (dict(x=jnp.zeros((4, 3), jnp.int32)), TypeError, "x must be a floating"),
    (dict(expert_ids=jnp.zeros((4, 1))), TypeError, "expert_ids must be an integer"),
    (dict(expert_ids=jnp.zeros((5, 1), jnp.int32)), ValueError, "one row per token"),
    (dict(expert_ids=jnp.zeros((4,), jnp.int32)), ValueError, "expert_ids must have rank 2"),
    (dict(backend="nope"), ValueError, "backend"),
])
def test_dispatch_bad_input_raises_at_trace_time(kwargs, error, match):
    args = dict(x=jnp.zeros((4, 3)), expert_ids=jnp.zeros((4, 1), jnp.int32), num_experts=2,
                axis_name="ep") | kwargs

    def local():
        jep.dispatch(args.pop("x"), args.pop("expert_ids"), **args)
        return jnp.zeros(())

    with pytest.raises(error, match=match):
        run_local(local)


def test_combine_bad_input_raises_at_trace_time():
    def local():
        recv_x, _, handle = jep.dispatch(jnp.zeros((4, 3)), jnp.zeros((4, 2), jnp.int32),
                                         num_experts=2, axis_name="ep")
        with pytest.raises(ValueError, match="weights must have shape"):
            jep.combine(recv_x, handle, jnp.ones((4, 3)))
        with pytest.raises(ValueError, match="one row per row of recv_x"):
            jep.combine(recv_x[1:], handle, jnp.ones((4, 2)))
        with pytest.raises(TypeError, match="DispatchHandle"):
            jep.combine(recv_x, (), jnp.ones((4, 2)))
        return jnp.zeros(())

    run_local(local)


def test_xla_transport_on_cpu_raises_naming_the_fallback():
    if jep.transport.current_platform() != "cpu":
        pytest.skip("the CPU has no ragged all-to-all; elsewhere xla runs")

    def local():
        jep.dispatch(jnp.zeros((4, 3)), jnp.zeros((4, 1), jnp.int32), num_experts=2,
                     axis_name="ep", backend="xla")
        return jnp.zeros(())

    with pytest.raises(ValueError, match="backend='reference'"):
        run_local(local)



@functools.lru_cache(maxsize=None)
def fp8_pair_fn(num_ranks, num_experts, capacity, backend, nodes=None):
    """jit(shard_map) of an FP8 dispatch of x and a dispatch of x quantized and dequantized at
    home, with the vjp of each; over `nodes` x (num_ranks / nodes) in hierarchical mode where
    `nodes` is given."""
    if nodes is None:
        mesh, axis, mode = make_mesh((num_ranks,), ("ep",)), "ep", "flat"
    else:
        mesh = make_mesh((nodes, num_ranks // nodes), ("node", "local"))
        axis, mode = ("node", "local"), "hierarchical"

    def local(x, ids, g):
        def run(x, fp8):
            recv_x, sizes, _ = jep.dispatch(x, ids[0], num_experts=num_experts, axis_name=axis,
                                            capacity=capacity, backend=backend, fp8=fp8,
                                            mode=mode)
            return recv_x, sizes
        x = x[0]
        home = jep.fp8.dequantize_rows(*jep.fp8.quantize_rows(x), x.dtype)
        (got, sizes), vjp = jax.vjp(lambda x: run(x, True), x)
        (want, want_sizes), want_vjp = jax.vjp(lambda x: run(x, False), home)
        zero = jnp.zeros(sizes.shape, jax.dtypes.float0)
        return tuple(a[None] for a in (got, want, sizes, want_sizes, vjp((g[0], zero))[0],
                                       want_vjp((g[0], zero))[0]))

    spec = P(mesh.axis_names)
    mapped = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=(spec,) * 6))
    return lambda *args: mapped(*(put(mesh, a, spec) for a in args))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_ranks, kind, capacity, nodes", [
    (1, "random", None, None), (2, "one_hot", None, None), (4, "random", 3, None),
    (8, "skewed", None, None),
    # Hierarchical: the packed rows cross both hops, dequantized after the second.
    (4, "random", None, 2), pytest.param(8, "skewed", 2, 2, marks=pytest.mark.slow),
    (8, "one_hot", None, 4)])
def test_fp8_dispatch_equals_a_dispatch_of_the_dequantized_tokens(rng, backend, num_ranks, kind,
                                                                  capacity, nodes):
    num_experts, num_tokens, top_k, hidden = 2 * num_ranks, 6, 2, 256
    ids = make_routing(kind, rng, num_ranks=num_ranks, num_tokens=num_tokens, top_k=top_k,
                       num_experts=num_experts)
    # A few magnitudes per token, so that the 128-channel tiles get scales apart.
    x = rng.normal(size=(num_ranks, num_tokens, hidden)) * 10.0 ** rng.uniform(
        -2, 2, size=(num_ranks, num_tokens, 2)).repeat(128, axis=-1)
    x = jnp.asarray(x, jnp.bfloat16)
    g = rng.normal(size=(num_ranks, num_ranks * num_tokens * top_k if capacity is None
                         else num_experts // num_ranks * capacity, hidden))
    got, want, sizes, want_sizes, dx, want_dx = fp8_pair_fn(
        num_ranks, num_experts, capacity, backend, nodes)(x, ids, jnp.asarray(g, jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    np.testing.assert_array_equal(sizes, want_sizes)
    # The gradient passes straight through the quantization: the same combine of g.
    np.testing.assert_array_equal(np.asarray(dx, np.float32), np.asarray(want_dx, np.float32))
    assert np.any(np.asarray(got, np.float32) != 0)


def test_fp8_dispatch_needs_128_channel_tiles():
    mesh = make_mesh((2,), ("ep",))

    def run(hidden, fp8=True):
        jax.shard_map(lambda x, i: jep.dispatch(x, i, num_experts=4, axis_name="ep", fp8=fp8)[0],
                      mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)(
            jnp.ones((4, hidden)), jnp.zeros((4, 2), jnp.int32))

    with pytest.raises(ValueError, match="multiple of 128"):
        run(100)
    with pytest.raises(TypeError, match="fp8 must be a bool"):
        run(128, fp8="yes")
    assert jep.DispatchConfig(fp8=True, mode="hierarchical").fp8  # every mode takes it


def test_eager_dispatch_and_combine_trace_once_per_shape(rng, monkeypatch):
    """From an eager shard_map (no jit around it) dispatch and combine run their cached jitted
    programs: a second call with the same shapes traces neither again, new shapes trace anew.
    JAX 0.10's eager shard_map still compiles each operation it runs on every call (its
    per-operation programs are not cached), but those are now the two programs and a few moves
    of their arguments: 10 compiles a call here, where tracing the calls' hundreds of
    operations one by one compiled about 390. Each call draws its own exchange ids, and the
    results stay right call after call."""
    traces = []

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            traces.append(name)
            return fn(*args, **kwargs)
        return wrapper

    for name in ("dispatch", "combine"):
        monkeypatch.setattr(jep.flat, name, counted(name, getattr(jep.flat, name)))
    mesh = make_mesh((4,), ("ep",))

    def local(x, ids, weights):
        recv_x, _, handle = jep.dispatch(x, ids, num_experts=8, axis_name="ep", backend="ffi")
        return jep.combine(recv_x * 2, handle, weights)

    eager = jax.shard_map(local, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))

    def call(num_tokens):
        ids = make_routing("random", rng, num_ranks=4, num_tokens=num_tokens, top_k=2,
                           num_experts=8).reshape(-1, 2)
        x = rng.normal(size=(4 * num_tokens, 3)).astype(np.float32)  # shapes of this test only
        weights = np.ones(ids.shape, np.float32)
        out = eager(*(put(mesh, jnp.asarray(a), P("ep")) for a in (x, ids, weights)))
        np.testing.assert_allclose(out, 4 * x, rtol=1e-6)  # each token to 2 experts, doubled
        return sorted(traces)

    with counting_compiles() as compiles:
        first = call(7)
        before = len(compiles)
        again = call(7)
        compiled_again = len(compiles) - before
        new_shapes = call(11)
    assert first == ["combine", "dispatch"] and again == first, (first, again)
    assert new_shapes == ["combine", "combine", "dispatch", "dispatch"], new_shapes
    assert compiled_again <= 16, compiled_again
