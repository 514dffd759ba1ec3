"""jep.balance: capacity policies against hand-worked and numpy references, the aux-loss-free
bias rule, load statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import P, make_mesh, put

import jep
from jep import balance


def on_ep(mesh, fn, *args):
    """fn(*args) inside shard_map, every argument split by rows over the "ep" axis."""
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=(P("ep"),) * len(args),
                           out_specs=P("ep"), check_vma=True)
    return jax.jit(mapped)(*(put(mesh, a, P("ep")) for a in args))


def reroute_on(mesh, expert_ids, choice, capacity):
    def fn(ids, choice):
        ids, rerouted, dropped = balance.reroute(ids, choice, capacity=capacity,
                                                 num_experts=choice.shape[1], axis_name="ep")
        return ids, rerouted[None], dropped[None]

    ids, rerouted, dropped = on_ep(mesh, fn, jnp.asarray(expert_ids, jnp.int32),
                                   jnp.asarray(choice, jnp.float32))
    return np.asarray(ids), int(rerouted.sum()), int(dropped.sum())


def test_reroute_hand_worked_example():
    # 4 experts, capacity 2 each, two ranks of two tokens, top-2. Pairs by position:
    #   rank 0: t0 -> (0, 1), t1 -> (0, 2);  rank 1: t2 -> (0, 1), t3 -> (3, 0).
    # Round 1: expert 0 takes t0 and t1 (first by position); t2's and t3's pairs to expert 0
    # find it full. Experts 1 (t0, t2), 2 (t1) and 3 (t3) take theirs.
    # Round 2: t2 moves to its third choice, expert 3 (room 1); t3 to its third, expert 2 (room 1).
    choice = np.array([[0.9, 0.8, 0.1, 0.0],   # t0: 0, 1, then 2, 3
                       [0.9, 0.1, 0.8, 0.0],   # t1: 0, 2, then 1, 3
                       [0.9, 0.8, 0.0, 0.1],   # t2: 0, 1, then 3, 2
                       [0.8, 0.0, 0.1, 0.9]])  # t3: 3, 0, then 2, 1
    ids = np.array([[0, 1], [0, 2], [0, 1], [3, 0]])
    mesh = make_mesh((2,), ("ep",))
    got, rerouted, dropped = reroute_on(mesh, ids, choice, capacity=2)
    np.testing.assert_array_equal(got, [[0, 1], [0, 2], [3, 1], [3, 2]])
    assert (rerouted, dropped) == (2, 0)
    # Capacity 1: 4 places for 8 pairs. Round 1 keeps t0->0, t0->1, t1->2, t3->3 and fills
    # every expert; the four other pairs try their tokens' remaining experts, all full, and drop.
    got, rerouted, dropped = reroute_on(mesh, ids, choice, capacity=1)
    np.testing.assert_array_equal(got, [[0, 1], [-1, 2], [-1, -1], [3, -1]])
    assert (rerouted, dropped) == (0, 4)


def skewed_choice(rng, num_tokens, num_experts, skew):
    """Selection scores where expert e is favoured ~ skew * (1 / (e + 1)) (Zipf-like)."""
    popularity = skew / (1.0 + rng.permutation(num_experts))
    return rng.random((num_tokens, num_experts)) + popularity


@pytest.mark.parametrize("skew", [0.0, 3.0, 100.0])
def test_reroute_drops_nothing_while_capacity_suffices_and_matches_numpy(rng, skew):
    num_tokens, num_experts, top_k, ranks = 64, 16, 2, 4
    choice = skewed_choice(rng, num_tokens, num_experts, skew)
    ids = np.argsort(-choice, axis=1)[:, :top_k]
    # Every pair has a place when pairs <= (E - k + 1) * capacity (module docstring).
    capacity = -(-num_tokens * top_k // (num_experts - top_k + 1))
    mesh = make_mesh((ranks,), ("ep",))
    got, rerouted, dropped = reroute_on(mesh, ids, choice, capacity)
    assert dropped == 0
    counts = np.bincount(got.reshape(-1), minlength=num_experts)
    assert counts.max() <= capacity
    assert all(len(set(row)) == top_k for row in got)  # a token's experts stay distinct
    # Experts that were not over capacity keep every pair they had.
    routed = np.bincount(ids.reshape(-1), minlength=num_experts)
    keep = routed[ids] <= capacity
    np.testing.assert_array_equal(got[keep], ids[keep])
    assert rerouted == np.sum(got != ids)
    preference = np.argsort(-choice, axis=1)
    want = jep.reference.overflow_pairs("reroute", ids, np.zeros(ids.shape), preference,
                                        capacity=capacity, num_experts=num_experts)
    np.testing.assert_array_equal(got, want)
    if skew == 100.0:
        assert rerouted > 0


@pytest.mark.parametrize("num_experts, top_k", [(16, 2), (1024, 4)])
def test_reroute_takes_tied_and_minus_inf_scores_in_lax_top_k_order(rng, num_experts, top_k):
    """Selection scores with ties (0 and -0 among them) and -inf (experts outside a token's
    groups under group-limited routing): a pair's next candidates are its token's experts in
    lax.top_k's order (ties to the lower index, -inf last but still candidates), as the numpy
    reference takes them. 1024 experts take the two-stage top-k on the CPU."""
    num_tokens, ranks = 32, 4
    choice = rng.integers(-2, 3, size=(num_tokens, num_experts)).astype(np.float32)
    choice[choice == 0] = rng.choice([0.0, -0.0], size=int((choice == 0).sum()))
    choice[rng.random(choice.shape) < 0.4] = -np.inf
    preference = np.asarray(jax.lax.top_k(jnp.asarray(choice), num_experts)[1])
    ids = preference[:, :top_k]
    capacity = max(1, num_tokens * top_k // num_experts)  # about one expert's share: reroutes
    mesh = make_mesh((ranks,), ("ep",))
    got, rerouted, dropped = reroute_on(mesh, ids, choice, capacity)
    want = jep.reference.overflow_pairs("reroute", ids, np.zeros(ids.shape), preference,
                                        capacity=capacity, num_experts=num_experts)
    np.testing.assert_array_equal(got, want)
    assert rerouted == np.sum((got != ids) & (got >= 0)) and rerouted > 0
    assert dropped == np.sum(got < 0)


def test_keep_by_probability_matches_numpy(rng):
    num_tokens, num_experts, top_k = 64, 8, 2
    ids = np.stack([rng.permutation(num_experts)[:top_k] for _ in range(num_tokens)])
    ids[rng.random(ids.shape) < 0.1] = -1  # some empty slots
    ids[:16, 0] = 3  # a hot expert
    weights = rng.random(ids.shape).astype(np.float32)
    weights[:8, 0] = 0.5  # ties, broken by position
    mesh = make_mesh((4,), ("ep",))

    def fn(ids, weights):
        kept, dropped = balance.keep_by_probability(ids, weights, capacity=5,
                                                    num_experts=num_experts, axis_name="ep")
        return kept, dropped[None]

    got, dropped = on_ep(mesh, fn, jnp.asarray(ids, jnp.int32), jnp.asarray(weights))
    want = jep.reference.overflow_pairs("probability", ids, weights, None, capacity=5,
                                        num_experts=num_experts)
    np.testing.assert_array_equal(got, want)
    assert int(dropped.sum()) == np.sum((ids >= 0) & (want < 0)) > 0


def test_update_bias_is_the_sign_rule():
    bias = jnp.array([0.0, 0.5, -0.5, 0.0])
    counts = jnp.array([10, 2, 4, 4])  # mean 5
    np.testing.assert_allclose(balance.update_bias(bias, counts, rate=0.1),
                               [-0.1, 0.6, -0.4, 0.1])
    np.testing.assert_allclose(balance.update_bias(bias, jnp.array([3, 3, 3, 3]), rate=0.1), bias)
    with pytest.raises(ValueError, match="rate"):
        balance.update_bias(bias, counts, rate=-1.0)
    with pytest.raises(ValueError, match="tokens_per_expert"):
        balance.update_bias(bias, counts[:3], rate=0.1)


def test_bias_rule_balances_a_skewed_router(rng):
    # A router that strongly prefers a few experts; 300 steps of the sign rule bring the
    # per-expert loads close to uniform (softmax scores are ~1/E = 0.03 here: the rate must be
    # well below that; 1e-3 keeps oscillating at max/mean ~1.7). Fresh tokens every step.
    num_tokens, num_experts, top_k = 512, 32, 4
    preference = 0.3 * np.log(1.0 / (1.0 + rng.permutation(num_experts)))

    @jax.jit
    def step(bias, key):
        logits = preference + 0.1 * jax.random.normal(key, (num_tokens, num_experts))
        _, ids = jep.route(logits, top_k=top_k, bias=bias)
        counts = jep.routing.expert_counts(ids, num_experts)
        return balance.update_bias(bias, counts, rate=3e-4), balance.imbalance(counts)

    bias = jnp.zeros(num_experts)
    keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), 300)
    history = []
    for key in keys:
        bias, worst = step(bias, key)
        history.append(float(worst))
    assert history[0] > 4.0
    assert np.mean(history[-20:]) < 1.5


def test_load_statistics():
    np.testing.assert_allclose(balance.imbalance(jnp.array([4, 0, 2, 2])), 2.0)
    assert balance.imbalance(jnp.zeros(3, jnp.int32)) == 0
    np.testing.assert_array_equal(balance.rank_loads(jnp.arange(8), 2), [6, 22])


def test_overflow_is_checked():
    with pytest.raises(ValueError, match="overflow"):
        jep.DispatchConfig(capacity=2, overflow="spill")


def zipf_load(rng, num_experts, scale=1e5):
    return scale / (1.0 + rng.permutation(num_experts))


@pytest.mark.parametrize("num_replicas, num_nodes", [(8, None), (16, None), (32, 2), (64, 4)])
def test_placement_of_a_zipf_load_is_within_10_percent_of_the_best_possible(rng, num_replicas,
                                                                            num_nodes):
    num_experts, num_ranks = 64, 8
    load = zipf_load(rng, num_experts)
    placement = balance.place_experts(load, num_replicas=num_replicas, num_ranks=num_ranks,
                                      num_nodes=num_nodes)
    slots = num_experts + num_replicas
    assert placement.physical_to_logical.shape == (slots,)
    assert np.bincount(placement.physical_to_logical, minlength=num_experts).tolist() == \
        placement.replica_count.tolist()
    for e in range(num_experts):  # each expert's slots, listed once each
        listed = placement.logical_to_physical[e]
        assert sorted(listed[listed >= 0]) == np.flatnonzero(placement.physical_to_logical == e).tolist()
    # The best any placement with these copies can do: the mean rank load, or the heaviest copy.
    rank_load = balance.rank_load_of(placement, load, num_ranks)
    best = max(load.sum() / num_ranks, (load / placement.replica_count).max())
    assert rank_load.max() <= 1.10 * best
    without = balance.rank_load_of(balance.identity_placement(num_experts), load, num_ranks)
    assert rank_load.max() < without.max()
    if num_nodes is None and placement.replica_count.max() <= num_ranks:
        # Copies of one expert sit on different ranks (where there are enough of them).
        per_rank = placement.physical_to_logical.reshape(num_ranks, -1)
        assert all(len(set(row)) == len(row) for row in per_rank)


def test_placement_rejects_what_does_not_fit():
    with pytest.raises(ValueError, match="divisible by num_ranks"):
        balance.place_experts(np.ones(8), num_replicas=3, num_ranks=4)
    with pytest.raises(ValueError, match="num_nodes"):
        balance.place_experts(np.ones(8), num_replicas=0, num_ranks=4, num_nodes=3)
    with pytest.raises(ValueError, match="load"):
        balance.place_experts(np.ones((2, 2, 2)), num_replicas=0, num_ranks=2)


@pytest.mark.parametrize("mesh_shape, names", [((4,), ("ep",)), ((2, 4), ("dp", "ep"))])
def test_replicated_experts_give_the_same_layer_and_gradients(rng, mesh_shape, names):
    # Physical slots holding copies of the logical weights: the output and every gradient equal
    # the layer's without replicas.
    num_experts, num_replicas, hidden, ffn = 8, 4, 8, 12
    mesh = make_mesh(mesh_shape, names, explicit=False)
    config = jep.MoEConfig(num_experts=num_experts, top_k=2,
                           dispatch=jep.DispatchConfig(backend="reference"))
    params = jep.init_params(jax.random.key(int(rng.integers(2**31))), hidden=hidden, ffn=ffn,
                             config=config)
    params["router"] = params["router"] * 50
    x = jnp.asarray(rng.normal(size=(64, hidden)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(64, hidden)), jnp.float32)
    placement = balance.place_experts(zipf_load(rng, num_experts), num_replicas=num_replicas,
                                      num_ranks=4)
    assert placement.replica_count.max() > 1
    experts = ("w_gate", "w_up", "w_down")
    slots = {k: (v[placement.physical_to_logical] if k in experts else v) for k, v in params.items()}

    def loss(p, placement):
        y, aux = jep.moe(x, p, config=config, mesh=mesh, placement=placement)
        return jnp.sum(y * cotangent) + aux["load_balancing_loss"], (y, aux)

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, (want_y, want_aux)), want = grad(params, None)
    (_, (y, aux)), got = grad(slots, placement)
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(aux["tokens_per_expert"], want_aux["tokens_per_expert"])
    np.testing.assert_allclose(got["router"], want["router"], rtol=1e-5, atol=1e-6)
    for k in experts:  # every copy's gradient is its logical expert's
        np.testing.assert_allclose(got[k], np.asarray(want[k])[placement.physical_to_logical],
                                   rtol=1e-5, atol=1e-6)
    # Each copy's own share of it differs from its sibling's; sum_replica_gradients adds the
    # shares up over the EP axis.
    hot = int(np.argmax(placement.replica_count))
    first, second = placement.logical_to_physical[hot, :2]
    shares = np.zeros(np.shape(got["w_up"]), np.float32)  # [P, H, F]
    shares[first] = 1.0
    shares[second] = 2.0
    summed = jax.jit(jax.shard_map(
        lambda g, pl: balance.sum_replica_gradients(g, pl, axis_name="ep"), mesh=mesh,
        in_specs=(P("ep"), P()), out_specs=P("ep")))(jnp.asarray(shares),
                                                     jax.tree.map(jnp.asarray, placement))
    np.testing.assert_array_equal(summed[first], np.full(shares.shape[1:], 3.0))
    np.testing.assert_array_equal(summed[second], np.full(shares.shape[1:], 3.0))
    others = np.delete(np.arange(len(shares)), placement.logical_to_physical[hot][
        placement.logical_to_physical[hot] >= 0])
    assert not np.asarray(summed)[others].any()


def test_move_experts_lays_slots_out_for_a_new_placement(rng):
    num_experts = 8
    old = balance.place_experts(zipf_load(rng, num_experts), num_replicas=4, num_ranks=4)
    new = balance.place_experts(zipf_load(rng, num_experts), num_replicas=4, num_ranks=4)
    logical = rng.normal(size=(num_experts, 3, 2)).astype(np.float32)
    state = {"w": logical[old.physical_to_logical], "mu": 2 * logical[old.physical_to_logical]}
    moved = balance.move_experts(state, old, new)
    np.testing.assert_array_equal(moved["w"], logical[new.physical_to_logical])
    np.testing.assert_array_equal(moved["mu"], 2 * logical[new.physical_to_logical])


def test_bad_placement_is_named():
    mesh = make_mesh((4,), ("ep",), explicit=False)
    config = jep.MoEConfig(num_experts=8, top_k=2)
    params = jep.init_params(jax.random.key(0), hidden=8, ffn=4, config=config)
    x = jnp.zeros((16, 8))
    with pytest.raises(ValueError, match=r"w_gate'\] must have shape \(12, 8, 4\)"):  # per slot
        jep.moe(x, params, config=config, mesh=mesh,
                placement=balance.place_experts(np.ones(8), num_replicas=4, num_ranks=4))
    with pytest.raises(ValueError, match="not divisible"):
        jep.moe(x, params, config=config, mesh=mesh,
                placement=balance.place_experts(np.ones(8), num_replicas=2, num_ranks=2))
