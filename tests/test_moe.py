"""The whole layer, `jep.moe`, against the per-token float64 `jep.reference.moe`."""

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import counting_compiles, make_mesh
from jax.sharding import NamedSharding

import jep

HIDDEN, FFN, TOKENS = 8, 12, 64

CONFIGS = {
    "softmax_top2": jep.MoEConfig(num_experts=8, top_k=2),
    "deepseek_v3_like": jep.MoEConfig(num_experts=16, top_k=4, score="sigmoid", num_groups=4,
                                      topk_groups=2, routed_scaling_factor=2.5),
    "capacity": jep.MoEConfig(num_experts=8, top_k=2,
                              dispatch=jep.DispatchConfig(capacity_factor=1.0)),
    "capacity_probability": jep.MoEConfig(
        num_experts=8, top_k=2, dispatch=jep.DispatchConfig(capacity_factor=1.0,
                                                            overflow="probability")),
    "capacity_reroute": jep.MoEConfig(
        num_experts=16, top_k=4, score="sigmoid", num_groups=4, topk_groups=2,
        dispatch=jep.DispatchConfig(capacity_factor=1.25, overflow="reroute")),
}
MESHES = [((1,), ("ep",)), ((2,), ("ep",)), ((4,), ("ep",)), ((8,), ("ep",)),
          ((2, 4), ("dp", "ep")), ((4, 2), ("dp", "ep"))]


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


def make_problem(rng, config, router_scale=1.0, dtype=np.float32):
    params = jep.init_params(jax.random.key(int(rng.integers(2**31))), hidden=HIDDEN, ffn=FFN,
                             config=config)
    params = jax.tree.map(np.asarray, params)
    params["router"] = params["router"] * 50 * router_scale  # decisive routing, no near-ties
    x = rng.normal(size=(TOKENS, HIDDEN)).astype(dtype)
    cotangent = rng.normal(size=(TOKENS, HIDDEN))
    return x, params, cotangent


def loss_and_aux(moe_fn, x, params, cotangent):
    y, aux = moe_fn(x, params)
    return jnp.sum(y * cotangent) + aux["load_balancing_loss"] + aux["router_z_loss"], (y, aux)


def run_jep(mesh, config, x, params, cotangent):
    fn = jax.jit(jax.value_and_grad(
        lambda x, p: loss_and_aux(lambda x, p: jep.moe(x, p, config=config, mesh=mesh), x, p, cotangent),
        argnums=(0, 1), has_aux=True))
    return fn(x, params)


def run_reference(mesh_shape, config, x, params, cotangent):
    ep, dp = mesh_shape[-1], (mesh_shape[0] if len(mesh_shape) == 2 else 1)
    with jax.enable_x64(True):
        as64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
        fn = jax.value_and_grad(
            lambda x, p: loss_and_aux(
                lambda x, p: jep.reference.moe(x, p, config=config, ep_size=ep, dp_size=dp),
                x, p, cotangent),
            argnums=(0, 1), has_aux=True)
        result = fn(as64(x), jax.tree.map(as64, params))
        return jax.tree.map(np.asarray, result)


def assert_matches_reference(got, want, tol):
    (_, (y, aux)), (dx, dparams) = got
    (_, (want_y, want_aux)), (want_dx, want_dparams) = want
    assert rel_err(y, want_y) < tol
    np.testing.assert_array_equal(aux["tokens_per_expert"], want_aux["tokens_per_expert"])
    np.testing.assert_array_equal(aux["num_dropped"], want_aux["num_dropped"])
    np.testing.assert_array_equal(aux["num_rerouted"], want_aux["num_rerouted"])
    for name in ("load_balancing_loss", "sequence_load_balancing_loss", "router_z_loss",
                 "expert_imbalance", "rank_imbalance"):
        np.testing.assert_allclose(aux[name], want_aux[name], rtol=tol)
    assert rel_err(dx, want_dx) < tol
    for name in ("router", "w_gate", "w_up", "w_down"):
        assert rel_err(dparams[name], want_dparams[name]) < tol, name


@pytest.mark.parametrize("mesh_shape, names", MESHES)
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_moe_matches_float64_reference_forward_and_gradients(rng, config_name, mesh_shape, names):
    config = CONFIGS[config_name]
    mesh = make_mesh(mesh_shape, names)
    x, params, cotangent = make_problem(rng, config)
    got = run_jep(mesh, config, x, params, cotangent)
    assert_matches_reference(got, run_reference(mesh_shape, config, x, params, cotangent), 1e-5)


@pytest.mark.parametrize("skew", ["all_to_one_expert", "empty_rank"])
def test_moe_skewed_routing_matches_reference(rng, skew):
    config = jep.MoEConfig(num_experts=8, top_k=1 if skew == "all_to_one_expert" else 2)
    mesh = make_mesh((4,), ("ep",))
    x, params, cotangent = make_problem(rng, config)
    bias = np.zeros(8, np.float32)
    if skew == "all_to_one_expert":
        bias[5] = 1e4  # every token picks expert 5: seven experts and three ranks get nothing
    else:
        bias[6:] = -1e4  # nobody picks the experts of rank 3
    params["bias"] = bias
    got = run_jep(mesh, config, x, params, cotangent)
    want = run_reference((4,), config, x, params, cotangent)
    assert_matches_reference(got, want, 1e-5)
    counts = np.asarray(got[0][1][1]["tokens_per_expert"])
    assert counts[5] == TOKENS if skew == "all_to_one_expert" else counts[6:].sum() == 0


def test_moe_bfloat16_within_1e2(rng):
    config = CONFIGS["deepseek_v3_like"]
    mesh = make_mesh((2, 4), ("dp", "ep"))
    x, params, _ = make_problem(rng, config)
    params16 = {k: (v if k == "router" else jnp.asarray(v, jnp.bfloat16)) for k, v in params.items()}
    y, _ = jax.jit(lambda x, p: jep.moe(x, p, config=config, mesh=mesh))(
        jnp.asarray(x, jnp.bfloat16), params16)
    # The reference sees the same bf16-rounded inputs, in float64.
    rounded = jax.tree.map(lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32), params)
    rounded["router"] = params["router"]
    with jax.enable_x64(True):
        want, _ = jep.reference.moe(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64),
                                    jax.tree.map(lambda a: np.asarray(a, np.float64), rounded),
                                    config=config, ep_size=4, dp_size=2)
    assert y.dtype == jnp.bfloat16
    assert rel_err(y, want) < 1e-2


def test_moe_uses_the_mesh_set_with_set_mesh_and_auto_axes(rng):
    config = CONFIGS["softmax_top2"]
    mesh = make_mesh((2, 4), ("dp", "ep"), explicit=False)
    x, params, _ = make_problem(rng, config)
    with jax.set_mesh(mesh):
        y, _ = jax.jit(lambda x, p: jep.moe(x, p, config=config))(x, params)
    want, _ = jep.moe(x, params, config=config, mesh=mesh)
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mesh_shape, explicit, sharded", [
    ((2, 4), True, False), ((2, 4), True, True), ((1, 8), True, True), ((2, 4), False, False)])
@pytest.mark.parametrize("leading", [(256,), (4, 64), (2, 2, 64), (2, 128), (16, 16)])
def test_moe_takes_any_leading_shape_on_explicit_and_auto_meshes(rng, mesh_shape, explicit,
                                                                 leading, sharded):
    """x [..., H] of 256 tokens: y has x's shape and the values of the [T, H] layer, whether x
    comes whole or split over the mesh, and the result is split over the mesh where x's
    leading axes allow (explicit axes: a reshape there must be told its sharding)."""
    moe_module = importlib.import_module("jep.moe")
    config = CONFIGS["softmax_top2"]
    mesh = make_mesh(mesh_shape, ("dp", "ep"), explicit=explicit)
    params = jep.init_params(jax.random.key(1), hidden=HIDDEN, ffn=FFN, config=config)
    tokens = jnp.asarray(rng.normal(size=(256, HIDDEN)), jnp.float32)
    want, want_aux = jep.moe(tokens, params, config=config, mesh=mesh)
    x = tokens.reshape(*leading, HIDDEN)
    if sharded:
        x = jax.device_put(x, NamedSharding(mesh, moe_module._leading_spec(x.shape, mesh)))
    y, aux = jep.moe(x, params, config=config, mesh=mesh)
    assert y.shape == x.shape
    np.testing.assert_allclose(np.asarray(y).reshape(256, HIDDEN), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(aux["tokens_per_expert"], want_aux["tokens_per_expert"])
    if explicit:
        assert y.sharding.spec == moe_module._leading_spec(x.shape, mesh)


@pytest.mark.parametrize("change, error, match", [
    (dict(config=jep.MoEConfig(num_experts=6, top_k=2)), ValueError, "divisible"),
    (dict(config=jep.MoEConfig(num_experts=8, top_k=2, axis_name="expert")), ValueError, "not an axis"),
    (dict(x=np.zeros((10, HIDDEN), np.float32)), ValueError, "cannot split evenly"),
    (dict(x=np.zeros((TOKENS, HIDDEN), np.int32)), TypeError, "x must be a floating"),
    (dict(drop="w_up"), ValueError, "params must hold 'w_up'"),
    (dict(params_change={"router": np.zeros((HIDDEN, 7), np.float32)}), ValueError, "router"),
    (dict(params_change={"w_down": np.zeros((8, FFN + 1, HIDDEN), np.float32)}), ValueError, "w_down"),
    (dict(config="not a config"), TypeError, "MoEConfig"),
    (dict(config=jep.MoEConfig(num_experts=8, top_k=2, num_groups=2, topk_groups=3)), ValueError,
     "topk_groups"),
])
def test_moe_bad_input_raises_at_trace_time(rng, change, error, match):
    config = CONFIGS["softmax_top2"]
    mesh = make_mesh((4,), ("ep",))
    x, params, _ = make_problem(rng, config)
    params = dict(params) | change.get("params_change", {})
    params.pop(change.get("drop", None), None)
    with pytest.raises(error, match=match):
        jax.eval_shape(lambda x, p: jep.moe(x, p, config=change.get("config", config), mesh=mesh),
                       change.get("x", x), params)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_experts=4, top_k=5), "top_k"),
    (dict(num_experts=4, top_k=0), "top_k"),
    (dict(num_experts=0, top_k=1), "num_experts"),
    (dict(num_experts=4, top_k=1, score="tanh"), "score"),
])
def test_config_bad_values_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jep.MoEConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(capacity=-1), dict(capacity=2, capacity_factor=1.0),
                                    dict(capacity_factor=0.0)])
def test_dispatch_config_bad_values_raise(kwargs):
    with pytest.raises(ValueError, match="capacity"):
        jep.DispatchConfig(**kwargs)


@pytest.mark.parametrize("overflow", ["position", "probability", "reroute"])
def test_sequences_spanning_ranks_and_overflow_policies_match_reference(rng, overflow):
    # 2 sequences of 32 tokens on 8 ranks: each sequence spans four ranks, and its
    # per-sequence balancing loss adds up pieces from all of them.
    config = jep.MoEConfig(num_experts=8, top_k=2, dispatch=jep.DispatchConfig(
        capacity_factor=0.75, overflow=overflow))
    mesh = make_mesh((2, 4), ("dp", "ep"), explicit=False)
    x, params, cotangent = make_problem(rng, config)
    x, cotangent = x.reshape(2, 32, HIDDEN), cotangent.reshape(2, 32, HIDDEN)
    got = run_jep(mesh, config, x, params, cotangent)
    want = run_reference((2, 4), config, x, params, cotangent)
    assert_matches_reference(got, want, 1e-5)
    assert got[0][1][1]["num_dropped"] > 0  # the capacity bites
    assert (got[0][1][1]["num_rerouted"] > 0) == (overflow == "reroute")


@pytest.mark.parametrize("num_chunks", [2, 4])
@pytest.mark.parametrize("config_name", ["softmax_top2", "deepseek_v3_like", "capacity_reroute"])
def test_chunked_layer_matches_reference_forward_and_gradients(rng, config_name, num_chunks):
    """Chunks of a rank's tokens, each routed, dispatched and combined on its own; dropless
    results equal the reference (with a capacity it applies to each chunk's tokens). The
    chunks' dispatches and combines share cached traces (`jep.dispatch`), and XLA:CPU runs
    their exchanges in different orders on different devices: this fails when the exchanges'
    op ids are drawn per trace instead of per call site."""
    base = CONFIGS[config_name]
    config = dataclasses.replace(base, dispatch=dataclasses.replace(base.dispatch,
                                                                    num_chunks=num_chunks))
    mesh = make_mesh((2, 4), ("dp", "ep"))
    x, params, cotangent = make_problem(rng, config)
    got = run_jep(mesh, config, x, params, cotangent)
    if base.dispatch.capacity_factor is None:
        assert_matches_reference(got, run_reference((2, 4), config, x, params, cotangent), 1e-5)
    plain = run_jep(mesh, base, x, params, cotangent)
    (_, (y, aux)), (dx, _) = got
    (_, (want_y, want_aux)), (want_dx, _) = plain
    if base.dispatch.capacity_factor is None:
        assert rel_err(y, want_y) < 1e-6 and rel_err(dx, want_dx) < 1e-6
    else:  # each chunk has its share of the capacity: at most as many pairs fit
        assert aux["num_dropped"] >= want_aux["num_dropped"]


@pytest.mark.parametrize("gated", [False, True], ids=["deepseek", "qwen2-gated"])
def test_shared_expert_matches_reference_forward_and_gradients(rng, gated):
    """The shared expert beside the routed ones (DeepSeek), and scaled per token by
    sigmoid(x @ shared_expert_gate) (Qwen2-MoE), against the float64 per-token reference."""
    config = CONFIGS["softmax_top2"]
    mesh_shape = (2, 4)
    mesh = make_mesh(mesh_shape, ("dp", "ep"))
    x, params, cotangent = make_problem(rng, config)
    params |= {"shared_gate": rng.normal(size=(HIDDEN, 6)).astype(np.float32) / 3,
               "shared_up": rng.normal(size=(HIDDEN, 6)).astype(np.float32) / 3,
               "shared_down": rng.normal(size=(6, HIDDEN)).astype(np.float32) / 3}
    if gated:
        params["shared_expert_gate"] = rng.normal(size=(HIDDEN, 1)).astype(np.float32)
    got = run_jep(mesh, config, x, params, cotangent)
    want = run_reference(mesh_shape, config, x, params, cotangent)
    assert_matches_reference(got, want, 1e-5)
    for name in ("shared_gate", "shared_up", "shared_down") + (("shared_expert_gate",) * gated):
        assert rel_err(got[1][1][name], want[1][1][name]) < 1e-5, name
    # Without its shared expert the layer differs: the gate or the expert is really applied.
    plain = {k: v for k, v in params.items() if not k.startswith("shared")}
    assert rel_err(jep.moe(x, plain, config=config, mesh=mesh)[0], want[0][1][0]) > 1e-2


@pytest.mark.parametrize("change, match", [
    (lambda p: {k: v for k, v in p.items() if k != "shared_up"}, "all of"),
    (lambda p: {**p, "shared_expert_gate": np.zeros((HIDDEN, 2), np.float32)}, "shared_expert_gate"),
    (lambda p: {k: v for k, v in p.items() if k not in ("shared_gate", "shared_up", "shared_down")},
     "scales a shared expert"),
])
def test_shared_expert_params_must_be_whole(rng, change, match):
    config = CONFIGS["softmax_top2"]
    mesh = make_mesh((4,), ("ep",))
    x, params, _ = make_problem(rng, config)
    params |= {"shared_gate": np.zeros((HIDDEN, 6), np.float32),
               "shared_up": np.zeros((HIDDEN, 6), np.float32),
               "shared_down": np.zeros((6, HIDDEN), np.float32),
               "shared_expert_gate": np.zeros((HIDDEN, 1), np.float32)}
    with pytest.raises(ValueError, match=match):
        jep.moe(x, change(params), config=config, mesh=mesh)


@pytest.mark.skipif("ffi" not in jep.transport.available(),
                    reason="the low-latency calls run where the ffi transport runs")
@pytest.mark.parametrize("config_name", ["softmax_top2", "deepseek_v3_like", "capacity"])
def test_low_latency_mode_matches_reference_forward(rng, config_name):
    base = CONFIGS[config_name]
    config = dataclasses.replace(base, dispatch=dataclasses.replace(base.dispatch,
                                                                    mode="low_latency"))
    mesh = make_mesh((2, 4), ("dp", "ep"))
    x, params, _ = make_problem(rng, config)
    y, aux = jax.jit(lambda x, p: jep.moe(x, p, config=config, mesh=mesh))(x, params)
    want_y, want_aux = jax.jit(lambda x, p: jep.moe(x, p, config=base, mesh=mesh))(x, params)
    assert rel_err(y, want_y) < 1e-6
    np.testing.assert_array_equal(aux["num_dropped"], want_aux["num_dropped"])
    if base.dispatch.capacity_factor is None:
        with jax.enable_x64(True):
            want = jep.reference.moe(np.asarray(x, np.float64),
                                     jax.tree.map(lambda a: np.asarray(a, np.float64), params),
                                     config=config, ep_size=4, dp_size=2)
        assert rel_err(y, want[0]) < 1e-5


def test_num_chunks_must_divide_the_tokens_of_a_device(rng):
    config = jep.MoEConfig(num_experts=8, top_k=2, dispatch=jep.DispatchConfig(num_chunks=3))
    mesh = make_mesh((4,), ("ep",))
    x, params, _ = make_problem(rng, config)
    with pytest.raises(ValueError, match="num_chunks"):
        jax.eval_shape(lambda x, p: jep.moe(x, p, config=config, mesh=mesh), x, params)
    with pytest.raises(ValueError, match="num_chunks"):
        jep.DispatchConfig(num_chunks=0)


def test_eager_calls_with_the_same_shapes_compile_once(rng):
    mesh = make_mesh((2, 4), ("dp", "ep"))
    config = jep.MoEConfig(num_experts=8, top_k=2)
    params = jep.init_params(jax.random.key(0), hidden=16, ffn=8, config=config)
    x, other = (jnp.asarray(rng.normal(size=(64, 16)), jnp.float32) for _ in range(2))
    with counting_compiles() as compiles:
        jep.moe(x, params, config=config, mesh=mesh)
        first = len(compiles)
        jep.moe(other, params, config=config, mesh=mesh)
        again = len(compiles) - first
        jep.moe(x[:32], params, config=config, mesh=mesh)  # new shapes: compiled anew
        new_shapes = len(compiles) - first - again
    assert first > 0 and again == 0 and new_shapes > 0, (first, again, new_shapes)


@pytest.mark.parametrize("mode", ["flat", "low_latency"])
def test_fp8_dispatch_layer_is_close_to_the_bf16_one(rng, mode):
    """DispatchConfig(fp8=True): the experts see the tokens through e4m3 (relative error about
    2^-5 a value), routing and combine are unchanged; gradients pass through."""
    mesh = make_mesh((4,), ("ep",))
    base = jep.MoEConfig(num_experts=8, top_k=2)
    params = jep.init_params(jax.random.key(1), hidden=128, ffn=64, config=base)
    x = jnp.asarray(rng.normal(size=(32, 128)), jnp.float32)

    def run(fp8):
        config = dataclasses.replace(base, dispatch=jep.DispatchConfig(fp8=fp8, mode=mode))
        layer = lambda x, p: jep.moe(x, p, config=config, mesh=mesh)[0]  # noqa: E731
        if mode == "low_latency":  # forward only
            return jax.jit(layer)(x, params), None
        return jax.jit(jax.value_and_grad(lambda x, p: jnp.sum(layer(x, p) ** 2),
                                          argnums=(0, 1)))(x, params)

    (got, got_grads), (want, want_grads) = run(True), run(False)
    if mode == "low_latency":
        got, want = np.asarray(got), np.asarray(want)
        assert 0 < rel_err(got, want) < 0.05
        return
    assert 0 < abs(float(got) - float(want)) < 0.05 * abs(float(want))
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        assert rel_err(np.asarray(a), np.asarray(b)) < 0.1


def test_fp8_experts_layer_is_close_to_the_bf16_one_and_chunks_quantize_alike(rng):
    """MoEConfig(expert_precision="fp8"): each product's input through e4m3 per 1 x 128 tile and
    each weight per 128 x 128 block (relative error a few 2^-5 a value), gradients to the
    master weights; a layer in two chunks quantizes every row and weight as one chunk does for
    the products and dx. The weight gradients' tiles are each chunk's rows of a group there
    (one chunk: all of the group's rows), so those differ by FP8's error (1.7% measured)."""
    mesh = make_mesh((4,), ("ep",))
    base = jep.MoEConfig(num_experts=8, top_k=2)
    params = jep.init_params(jax.random.key(2), hidden=128, ffn=128, config=base)
    x = jnp.asarray(rng.normal(size=(32, 128)), jnp.float32)

    def run(precision, num_chunks=1):
        config = dataclasses.replace(base, expert_precision=precision,
                                     dispatch=jep.DispatchConfig(num_chunks=num_chunks))
        layer = lambda x, p: jep.moe(x, p, config=config, mesh=mesh)[0]  # noqa: E731
        return jax.jit(jax.value_and_grad(lambda x, p: jnp.sum(layer(x, p) ** 2),
                                          argnums=(0, 1)))(x, params)

    (got, got_grads), (want, want_grads) = run("fp8"), run("bf16")
    assert 1e-4 * abs(float(want)) < abs(float(got) - float(want)) < 0.1 * abs(float(want))
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        assert a.dtype == b.dtype and rel_err(np.asarray(a), np.asarray(b)) < 0.2
    chunked, chunked_grads = run("fp8", num_chunks=2)
    np.testing.assert_allclose(float(chunked), float(got), rtol=1e-5)
    (chunked_dx, chunked_params), (dx, params_grads) = chunked_grads, got_grads
    np.testing.assert_allclose(np.asarray(chunked_dx), np.asarray(dx), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(chunked_params["router"]),
                               np.asarray(params_grads["router"]), rtol=1e-4, atol=1e-5)
    for name in ("w_gate", "w_up", "w_down"):  # quantized along each chunk's rows of a group
        assert 0 < rel_err(chunked_params[name], params_grads[name]) < 0.05
    with pytest.raises(ValueError, match="expert_precision must be one of"):
        jep.MoEConfig(num_experts=8, top_k=2, expert_precision="int8")
