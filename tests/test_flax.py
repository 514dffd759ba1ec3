"""jep.flax.MoE (linen) and jep.nnx.MoE equal jep.moe, and train under a user's jit and mesh."""

import flax
import optax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_mesh
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import jep

CONFIG = jep.MoEConfig(num_experts=8, top_k=2)
HIDDEN, FFN, SHARED = 16, 24, 20


def shared_expert(x, p):
    return (jax.nn.silu(x @ p["shared_gate"]) * (x @ p["shared_up"])) @ p["shared_down"]


@pytest.mark.parametrize("explicit", [True, False])
@pytest.mark.parametrize("shared_ffn", [0, SHARED])
def test_linen_module_equals_jep_moe_for_its_parameters(rng, explicit, shared_ffn):
    mesh = make_mesh((2, 4), ("dp", "ep"), explicit=explicit)
    x = jnp.asarray(rng.normal(size=(64, HIDDEN)), jnp.float32)
    module = jep.flax.MoE(config=CONFIG, ffn=FFN, shared_ffn=shared_ffn)
    with jax.set_mesh(mesh):
        variables = jax.jit(module.init)(jax.random.key(0), x)
        y, aux = jax.jit(module.apply)(variables, x)
    params = nn.unbox(variables)["params"]
    routed = {name: p for name, p in params.items() if not name.startswith("shared_")}
    want, want_aux = jax.jit(lambda x, p: jep.moe(x, p, config=CONFIG, mesh=mesh))(x, routed)
    if shared_ffn:  # the shared expert, added beside the routed experts
        want = want + shared_expert(x, params)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(aux["tokens_per_expert"], want_aux["tokens_per_expert"])
    specs = nn.get_partition_spec(variables)["params"]
    assert specs["w_gate"] == P("ep", None, None) and specs["router"] == P(None, None)
    assert ("shared_gate" in params) == bool(shared_ffn)


@pytest.mark.parametrize("explicit", [True, False])
@pytest.mark.parametrize("shared_ffn", [0, SHARED])
def test_nnx_module_equals_jep_moe_and_creates_sharded_parameters(rng, explicit, shared_ffn):
    mesh = make_mesh((2, 4), ("dp", "ep"), explicit=explicit)
    x = jnp.asarray(rng.normal(size=(64, HIDDEN)), jnp.float32)
    with jax.set_mesh(mesh):
        module = jep.nnx.MoE(HIDDEN, FFN, config=CONFIG, shared_ffn=shared_ffn, rngs=nnx.Rngs(0))
        y, aux = nnx.jit(lambda m, x: m(x))(module, x)
    params = {name: p[...] for name, p in module.params.items()}
    assert params["w_gate"].sharding.is_equivalent_to(NamedSharding(mesh, P("ep", None, None)), 3)
    # The parameters carry their sharding (flax >= 0.12.4 reads nnx.Param's out_sharding).
    specs = nnx.get_partition_spec(nnx.state(module))["params"]
    assert specs["w_gate"].get_value() == P("ep", None, None)
    assert specs["router"].get_value() == P(None, None)
    # The expert weights are found by their type.
    experts = nnx.state(module, jep.nnx.ExpertWeight)["params"]
    assert set(experts.keys()) == {"w_gate", "w_up", "w_down"}
    assert params["w_gate"].addressable_shards[0].data.shape == (2, HIDDEN, FFN)
    routed = {name: p for name, p in params.items() if not name.startswith("shared_")}
    want, want_aux = jax.jit(lambda x, p: jep.moe(x, p, config=CONFIG, mesh=mesh))(x, routed)
    if shared_ffn:  # the shared expert, added beside the routed experts
        want = want + shared_expert(x, params)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux["load_balancing_loss"], want_aux["load_balancing_loss"], rtol=1e-6)


def test_linen_and_nnx_modules_agree_with_the_same_parameters(rng):
    mesh = make_mesh((4,), ("ep",))
    x = jnp.asarray(rng.normal(size=(32, HIDDEN)), jnp.float32)
    with jax.set_mesh(mesh):
        nnx_module = jep.nnx.MoE(HIDDEN, FFN, config=CONFIG, rngs=nnx.Rngs(3))
        params = {name: p[...] for name, p in nnx_module.params.items()}
        y_nnx, _ = nnx.jit(lambda m, x: m(x))(nnx_module, x)
        y_linen, _ = jax.jit(jep.flax.MoE(config=CONFIG, ffn=FFN).apply)({"params": params}, x)
    np.testing.assert_allclose(y_nnx, y_linen, rtol=1e-6, atol=1e-6)


def test_modules_name_the_hidden_size_they_were_built_for(rng):
    mesh = make_mesh((4,), ("ep",))
    x = jnp.zeros((32, HIDDEN + 1))
    with jax.set_mesh(mesh):
        module = jep.nnx.MoE(HIDDEN, FFN, config=CONFIG, rngs=nnx.Rngs(0))
        with pytest.raises(ValueError, match=rf"x must have shape \[\.\.\., {HIDDEN}\]"):
            module(x)
        params = {name: p[...] for name, p in module.params.items()}
        # linen checks the parameter shapes first, with its own clear error.
        with pytest.raises(flax.errors.ScopeParamShapeError, match="router"):
            jep.flax.MoE(config=CONFIG, ffn=FFN).apply({"params": params}, x)


# Auto sharding's case in the slow job: the modules' other tests cover both mesh modes.
@pytest.mark.parametrize("explicit", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_modules_carry_and_update_the_selection_bias(rng, explicit):
    # The bias is state: the modules route with it, move it by the sign rule after a training
    # call, leave it alone in evaluation, and an optimizer over the parameters never sees it.
    mesh = make_mesh((2, 4), ("dp", "ep"), explicit=explicit)
    x = jnp.asarray(rng.normal(size=(64, HIDDEN)), jnp.float32)
    rate = 0.01
    with jax.set_mesh(mesh):
        module = jep.nnx.MoE(HIDDEN, FFN, config=CONFIG, rngs=nnx.Rngs(0), bias_rate=rate)
        params = {name: p[...] for name, p in module.params.items()}
        optimizer = nnx.Optimizer(module, optax.sgd(0.1), wrt=nnx.Param)

        @nnx.jit
        def train_step(module, optimizer, x):
            grads, aux = nnx.grad(lambda m: (lambda y, a: (jnp.sum(y**2), a))(*m(x)),
                                  has_aux=True)(module)
            optimizer.update(module, grads)
            return aux

        aux = train_step(module, optimizer, x)
        bias = np.asarray(module.bias[...])
        np.testing.assert_allclose(
            bias, jep.update_bias(jnp.zeros(8), aux["tokens_per_expert"], rate=rate))
        assert np.abs(bias).max() == rate
        assert not any(isinstance(leaf, jep.nnx.SelectionBias) for leaf in
                       jax.tree.leaves(nnx.state(module, nnx.Param), is_leaf=lambda v: True))
        # Evaluation routes with the bias and keeps it.
        module.eval()
        y, _ = nnx.jit(lambda m, x: m(x))(module, x)
        np.testing.assert_array_equal(module.bias[...], bias)
        params = {name: p[...] for name, p in module.params.items()}
        want, _ = jax.jit(lambda x, p: jep.moe(x, p, config=CONFIG, mesh=mesh))(
            x, params | {"bias": jnp.asarray(bias)})
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)

        linen = jep.flax.MoE(config=CONFIG, ffn=FFN, bias_rate=rate)
        variables = jax.jit(linen.init)(jax.random.key(0), x)
        np.testing.assert_array_equal(variables["balance"]["bias"], np.zeros(8))
        (y, aux), state = jax.jit(lambda v, x: linen.apply(v, x, mutable=["balance"]))(
            variables, x)
        np.testing.assert_allclose(
            state["balance"]["bias"],
            jep.update_bias(jnp.zeros(8), aux["tokens_per_expert"], rate=rate))
        y_eval, _ = jax.jit(linen.apply)(variables | state, x)  # not mutable: no update
        want, _ = jax.jit(lambda x, p: jep.moe(x, p, config=CONFIG, mesh=mesh))(
            x, nn.unbox(variables)["params"] | {"bias": state["balance"]["bias"]})
        np.testing.assert_allclose(y_eval, want, rtol=1e-5, atol=1e-6)


def test_nnx_replicated_experts_train_and_move_to_a_new_placement(rng):
    # A layer with 4 redundant copies: copies start equal and stay equal through a training
    # step; replace_experts moves weights and Adam moments to a placement made from a skewed
    # load; the layer computes the same function before and after the move.
    mesh = make_mesh((4,), ("ep",), explicit=False)
    x = jnp.asarray(rng.normal(size=(32, HIDDEN)), jnp.float32)

    class Model(nnx.Module):
        def __init__(self):
            self.moe = jep.nnx.MoE(HIDDEN, FFN, config=CONFIG, rngs=nnx.Rngs(0), num_replicas=4)

        def __call__(self, x):
            return self.moe(x)

    with jax.set_mesh(mesh):
        model = Model()
        placement = jax.tree.map(np.asarray, model.moe.placement.get_value())
        assert model.moe.params["w_up"][...].shape == (12, HIDDEN, FFN)
        optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

        @nnx.jit
        def train_step(model, optimizer, x):
            loss = lambda m: (lambda y, aux: (jnp.sum(y**2), aux))(*m(x))  # noqa: E731
            grads, aux = nnx.grad(loss, has_aux=True)(model)
            optimizer.update(model, grads)
            return aux

        aux = train_step(model, optimizer, x)

        def assert_copies_equal(values, placement):
            for e in range(CONFIG.num_experts):
                slots = placement.logical_to_physical[e]
                slots = slots[slots >= 0]
                for s in slots[1:]:
                    np.testing.assert_array_equal(values[s], values[slots[0]])

        assert_copies_equal(np.asarray(model.moe.params["w_up"][...]), placement)
        before = nnx.jit(lambda m, x: m(x)[0])(model, x)
        load = np.zeros(CONFIG.num_experts)
        load[5] = 100.0  # expert 5 hot: it gets the copies now
        load += 1
        moved = jep.nnx.replace_experts(model, {("moe",): load}, optimizer)
        old, new = moved[("moe",)]
        assert new.replica_count[5] == 5
        after = nnx.jit(lambda m, x: m(x)[0])(model, x)
        np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)
        w_up = np.asarray(model.moe.params["w_up"][...])
        assert_copies_equal(w_up, new)
        mu = dict(nnx.to_flat_state(nnx.state(optimizer)))[("opt_state", 0, "mu", "moe", "params", "w_up")]
        assert_copies_equal(np.asarray(mu[...]), new)
        assert np.abs(np.asarray(mu[...])).max() > 0
        aux = train_step(model, optimizer, x)  # trains on in the new placement
        assert_copies_equal(np.asarray(model.moe.params["w_up"][...]), new)


def test_linen_replicated_experts_and_replace_experts(rng):
    mesh = make_mesh((4,), ("ep",), explicit=False)
    x = jnp.asarray(rng.normal(size=(32, HIDDEN)), jnp.float32)
    module = jep.flax.MoE(config=CONFIG, ffn=FFN, num_replicas=4)
    with jax.set_mesh(mesh):
        variables = jax.jit(module.init)(jax.random.key(0), x)
        placement = jax.tree.map(np.asarray, variables["balance"]["placement"])
        params = nn.unbox(variables)["params"]
        assert params["w_up"].shape == (12, HIDDEN, FFN)
        np.testing.assert_array_equal(params["w_up"][placement.logical_to_physical[0, 0]],
                                      params["w_up"][placement.logical_to_physical[0, 1]])
        tx = optax.adam(1e-2)
        opt_state = tx.init(params)

        @jax.jit
        def train_step(variables, opt_state):
            grads = jax.grad(lambda p: jnp.sum(module.apply(
                {**variables, "params": p}, x)[0] ** 2))(variables["params"])
            updates, opt_state = tx.update(grads, opt_state, variables["params"])
            return {**variables, "params": optax.apply_updates(variables["params"], updates)}, opt_state

        variables = {**variables, "params": params}
        variables, opt_state = train_step(variables, opt_state)
        before = jax.jit(module.apply)(variables, x)[0]
        load = np.ones(CONFIG.num_experts)
        load[2] = 100.0
        variables, opt_state = jep.flax.replace_experts(variables, {(): load}, num_ranks=4,
                                                        opt_state=opt_state)
        new = jax.tree.map(np.asarray, variables["balance"]["placement"])
        assert new.replica_count[2] == 5
        after = jax.jit(module.apply)(variables, x)[0]
        np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)
        for tree in (variables["params"]["w_up"], opt_state[0].mu["w_up"], opt_state[0].nu["w_up"]):
            tree = np.asarray(tree)
            slots = new.logical_to_physical[2]
            for s in slots[1:]:
                np.testing.assert_array_equal(tree[s], tree[slots[0]])


@pytest.mark.parametrize("mode", ["flat", "hierarchical"])
def test_modules_over_node_and_local_axes_equal_jep_moe(rng, mode):
    """Both modules with config.axis_name=("node", "local"): experts sharded over the pair."""
    mesh = make_mesh((2, 4), ("node", "local"))
    config = jep.MoEConfig(num_experts=8, top_k=2, axis_name=("node", "local"),
                           dispatch=jep.DispatchConfig(mode=mode))
    x = jnp.asarray(rng.normal(size=(64, HIDDEN)), jnp.float32)
    module = jep.flax.MoE(config=config, ffn=FFN)
    with jax.set_mesh(mesh):
        variables = jax.jit(module.init)(jax.random.key(0), x)
        y, _ = jax.jit(module.apply)(variables, x)
        layer = jep.nnx.MoE(HIDDEN, FFN, config=config, rngs=nnx.Rngs(0))
        y_nnx, _ = nnx.jit(lambda layer, x: layer(x))(layer, x)
    params = nn.unbox(variables)["params"]
    assert nn.get_partition_spec(variables)["params"]["w_gate"] == P(("node", "local"), None, None)
    want, _ = jax.jit(lambda x, p: jep.moe(x, p, config=config, mesh=mesh))(x, params)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    nnx_params = {k: v[...] for k, v in nnx.to_flat_state(nnx.state(layer, nnx.Param))}
    want_nnx, _ = jax.jit(lambda x, p: jep.moe(x, p, config=config, mesh=mesh))(
        x, {path[-1]: value for path, value in nnx_params.items()})
    np.testing.assert_allclose(y_nnx, want_nnx, rtol=1e-5, atol=1e-6)


def test_modules_gate_their_shared_expert_when_asked(rng):
    """shared_expert_gate=True: both modules hold the Qwen2-MoE gate [H, 1] and equal jep.moe
    with it; without a shared expert it is refused."""
    mesh = make_mesh((4,), ("ep",))
    x = jnp.asarray(rng.normal(size=(32, HIDDEN)), jnp.float32)
    with jax.set_mesh(mesh):
        nnx_module = jep.nnx.MoE(HIDDEN, FFN, config=CONFIG, shared_ffn=SHARED,
                                 shared_expert_gate=True, rngs=nnx.Rngs(1))
        params = {name: p[...] for name, p in nnx_module.params.items()}
        y_nnx, _ = nnx.jit(lambda m, x: m(x))(nnx_module, x)
        linen_module = jep.flax.MoE(config=CONFIG, ffn=FFN, shared_ffn=SHARED,
                                    shared_expert_gate=True)
        y_linen, _ = jax.jit(linen_module.apply)({"params": params}, x)
        assert nn.unbox(jax.jit(linen_module.init)(jax.random.key(0), x))["params"][
            "shared_expert_gate"].shape == (HIDDEN, 1)
    want, _ = jax.jit(lambda x, p: jep.moe(x, p, config=CONFIG, mesh=mesh))(x, params)
    assert params["shared_expert_gate"].shape == (HIDDEN, 1)
    np.testing.assert_allclose(y_nnx, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y_linen, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs shared_ffn"):
        jep.nnx.MoE(HIDDEN, FFN, config=CONFIG, shared_expert_gate=True, rngs=nnx.Rngs(1))


def test_modules_import_as_flax_modules_do():
    import importlib

    from jep.nnx import MoE

    assert importlib.import_module("jep.nnx").MoE is MoE is jep.nnx.MoE is jep.flax.nnx.MoE
    assert importlib.import_module("jep.flax.linen").MoE is jep.flax.MoE


def test_import_jep_loads_flax_only_when_a_module_is_asked_for():
    import subprocess
    import sys
    code = ("import sys, jep; assert 'flax' not in sys.modules, 'import jep imported flax'; "
            "from jep.nnx import MoE; assert jep.flax.MoE and 'flax' in sys.modules")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
