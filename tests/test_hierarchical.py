"""Hierarchical (node, local) dispatch and combine against the flat mode over the same two axes
and the float64 reference: forward, gradients, and the rows that cross the node axis."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import P, make_mesh, put
from routings import CALLER_KINDS, KINDS, make_routing

import jep
from jep import hierarchical, reference

AXES = ("node", "local")
HIDDEN = 6


@functools.lru_cache(maxsize=None)
def layer_fn(shape, num_experts, capacity, mode):
    """jit(shard_map) over a (node, local) mesh of dispatch -> y = 2 x + 1 per expert row ->
    combine, with its value and gradients for x and the weights; global [n, T, ...] arrays."""
    mesh = make_mesh(shape, AXES, explicit=False)
    spec = P(AXES)

    def local(x, ids, weights, scale):
        recv_x, group_sizes, handle = jep.dispatch(
            x[0], ids[0], num_experts=num_experts, axis_name=AXES, capacity=capacity, mode=mode)
        rows = jnp.arange(recv_x.shape[0]) < group_sizes.sum()
        y = jnp.where(rows[:, None], recv_x * scale[0] + 1.0, 0.0)
        out = jep.combine(y, handle, weights[0])
        node = (hierarchical.node_rows(handle) if mode == "hierarchical"
                else jnp.zeros((), jnp.int32))
        return out[None], handle.num_dropped[None], node[None]

    mapped = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 4, out_specs=(spec,) * 3)

    def run(x, ids, weights, scale, g):
        def loss(x, weights):
            out, dropped, node = mapped(x, ids, weights, scale)
            return jnp.sum(out * g), (out, dropped, node)
        (_, (out, dropped, node)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            x, weights)
        return out, dropped, node, grads

    jitted = jax.jit(run)
    return lambda *args: jitted(*(put(mesh, a, spec) for a in args))


def inputs(rng, kind, shape, num_tokens, top_k, num_experts):
    n = int(np.prod(shape))
    ids = make_routing(kind, rng, num_ranks=n, num_tokens=num_tokens, top_k=top_k,
                       num_experts=num_experts)
    x = rng.normal(size=(n, num_tokens, HIDDEN)).astype(np.float32)
    weights = rng.random(ids.shape).astype(np.float32)
    scale = np.full((n, 1), 2.0, np.float32)
    g = rng.normal(size=x.shape).astype(np.float32)
    return x, ids, weights, scale, g


@pytest.mark.parametrize("shape", [(2, 4), (4, 2), (2, 2)])
@pytest.mark.parametrize("kind", KINDS + CALLER_KINDS)
def test_hierarchical_equals_flat_forward_and_gradients(rng, shape, kind):
    num_experts = 2 * int(np.prod(shape))
    x, ids, weights, scale, g = inputs(rng, kind, shape, 7, 3, num_experts)
    flat = layer_fn(shape, num_experts, None, "flat")(x, ids, weights, scale, g)
    tiered = layer_fn(shape, num_experts, None, "hierarchical")(x, ids, weights, scale, g)
    for got, want in zip(jax.tree.leaves(tiered[0:1] + tiered[3:]), jax.tree.leaves(flat[0:1] + flat[3:])):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # And both equal the reference: each token gets sum_j w_j (2 x + 1) over its slots with an
    # expert (a repeated one counted once per slot).
    valid = ((ids >= 0) & (ids < num_experts)).astype(np.float64)
    want = (2 * x.astype(np.float64) + 1) * (weights * valid).sum(-1, keepdims=True)
    np.testing.assert_allclose(tiered[0], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_at_most_one_row_per_token_and_destination_node_crosses_the_node_axis(rng, kind):
    shape, num_experts, top_k = (4, 2), 32, 6
    x, ids, weights, scale, g = inputs(rng, kind, shape, 9, top_k, num_experts)
    _, _, node, _ = layer_fn(shape, num_experts, None, "hierarchical")(x, ids, weights, scale, g)
    num_nodes, per_node = shape[0], num_experts // shape[0]
    for rank in range(ids.shape[0]):
        my_node = rank // shape[1]
        nodes = [{e // per_node for e in token if e >= 0} - {my_node} for token in ids[rank]]
        assert node[rank] == sum(len(s) for s in nodes)
    # Flat sends a token to each *rank* of its experts: at least as many rows leave the node.
    flat_rows = sum(len({e // (num_experts // 8) for e in token if e >= 0} -
                        set(range((r // 2) * 2, (r // 2) * 2 + 2)))
                    for r in range(8) for token in ids[r])
    assert node.sum() <= flat_rows


@pytest.mark.parametrize("capacity", [0, 1, 3])
def test_capacity_in_hierarchical_mode_drops_and_counts_like_the_reference(rng, capacity):
    """Capacity applies at the expert ranks (hop 2) in both modes; the rows kept may differ in
    order of arrival, but every token's output is the sum over the pairs that were kept, and the
    counts of dropped pairs add up."""
    shape, num_experts = (2, 4), 16
    x, ids, weights, scale, g = inputs(rng, "one_expert", shape, 5, 2, num_experts)
    out, dropped, _, _ = layer_fn(shape, num_experts, capacity, "hierarchical")(
        x, ids, weights, scale, g)
    # With every token on experts 0 and 1 (rank 0), each of them keeps `capacity` of 8 * 5 pairs.
    assert int(dropped.sum()) == 2 * (8 * 5 - min(capacity, 8 * 5))
    kept = np.isclose(out, 0).all(-1) == False  # noqa: E712
    assert kept.sum() <= 2 * capacity


def test_node_slots_name_each_node_once():
    ids = jnp.asarray([[0, 5, 1, 9], [7, -1, 6, 15], [3, 2, 1, 0]])
    got = hierarchical.node_slots(ids, experts_per_node=4, num_nodes=4)
    np.testing.assert_array_equal(got, [[0, 1, -1, 2], [1, -1, -1, 3], [0, -1, -1, -1]])


def test_hierarchical_mode_needs_two_axes():
    mesh = make_mesh((2,), ("ep",), explicit=False)
    f = jax.shard_map(lambda x, i: jep.dispatch(x, i, num_experts=4, axis_name="ep",
                                                mode="hierarchical")[0],
                      mesh=mesh, in_specs=(P("ep"), P("ep")), out_specs=P("ep"))
    with pytest.raises(ValueError, match="needs axis_name=\\(node axis, local axis\\)"):
        f(jnp.zeros((4, 8)), jnp.zeros((4, 2), jnp.int32))
    with pytest.raises(ValueError, match="mode must be one of"):
        jax.shard_map(lambda x, i: jep.dispatch(x, i, num_experts=4, axis_name="ep",
                                                mode="tiered")[0],
                      mesh=mesh, in_specs=(P("ep"), P("ep")), out_specs=P("ep"))(
            jnp.zeros((4, 8)), jnp.zeros((4, 2), jnp.int32))


@pytest.mark.parametrize("mode", ["flat", "hierarchical"])
def test_moe_over_node_and_local_axes_matches_the_reference(rng, mode):
    """jep.moe with config.axis_name=("node", "local"): experts over both axes, forward and
    gradients of every parameter against the float64-capable reference."""
    mesh = make_mesh((2, 4), AXES)
    config = jep.MoEConfig(num_experts=16, top_k=3, axis_name=AXES,
                           dispatch=jep.DispatchConfig(mode=mode))
    params = jep.init_params(jax.random.key(1), hidden=8, ffn=12, config=config)
    params["router"] = params["router"] * 20  # decisive routing
    x = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)

    def loss(params, x, moe):
        y, _ = moe(x, params)
        return jnp.sum(y * g)

    got = jax.jit(jax.value_and_grad(lambda p, x: loss(
        p, x, lambda x, p: jep.moe(x, p, config=config, mesh=mesh)), argnums=(0, 1)))(params, x)
    want = jax.value_and_grad(lambda p, x: loss(
        p, x, lambda x, p: jep.reference.moe(x, p, config=config)), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_fp8_moe_over_node_and_local_axes_equals_the_flat_one(rng):
    """FP8 dispatch in hierarchical mode (the packed rows cross both hops) gives the layer the
    flat mode's FP8 dispatch gives it: forward and gradients, float32 rows."""
    mesh = make_mesh((2, 4), AXES)
    configs = {mode: jep.MoEConfig(num_experts=16, top_k=3, axis_name=AXES,
                                   dispatch=jep.DispatchConfig(mode=mode, fp8=True))
               for mode in ("flat", "hierarchical")}
    params = jep.init_params(jax.random.key(2), hidden=128, ffn=16, config=configs["flat"])
    x = jnp.asarray(rng.normal(size=(32, 128)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(32, 128)), jnp.float32)
    run = {mode: jax.jit(jax.value_and_grad(
        lambda p, x, config=config: jnp.sum(jep.moe(x, p, config=config, mesh=mesh)[0] * g),
        argnums=(0, 1))) for mode, config in configs.items()}
    got, want = run["hierarchical"](params, x), run["flat"](params, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # ... and the quantization happened: the loss is not the unquantized layer's.
    plain = jep.MoEConfig(num_experts=16, top_k=3, axis_name=AXES)
    assert float(got[0]) != float(jnp.sum(jep.moe(x, params, config=plain, mesh=mesh)[0] * g))


def test_hierarchical_config_needs_two_axes():
    with pytest.raises(ValueError, match="needs MoEConfig.axis_name = \\(node axis, local axis\\)"):
        jep.MoEConfig(num_experts=8, top_k=2, dispatch=jep.DispatchConfig(mode="hierarchical"))
    with pytest.raises(TypeError, match="axis_name must be a mesh axis name or a tuple"):
        jep.MoEConfig(num_experts=8, top_k=2, axis_name=["node", "local"])
