"""jep.route and the balancing losses against per-token references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jep
from jep import reference

CASES = [
    dict(score="softmax"),
    dict(score="sigmoid"),
    dict(score="softmax", renormalize=False),
    dict(score="sigmoid", num_groups=4, topk_groups=2),
    dict(score="softmax", num_groups=8, topk_groups=3),
    dict(score="sigmoid", num_groups=16, topk_groups=5),  # one expert per group
]


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_route_matches_per_token_reference(rng, case, with_bias):
    logits = rng.normal(size=(64, 16)).astype(np.float32)
    bias = rng.normal(size=16).astype(np.float32) if with_bias else None
    weights, ids = jep.route(jnp.asarray(logits), top_k=4, bias=bias, **case)
    want_w, want_ids = jax.vmap(lambda l: reference.route_token(l, top_k=4, bias=bias, **case))(logits)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(weights, want_w, rtol=1e-6)
    assert ids.dtype == jnp.int32 and weights.dtype == jnp.float32
    assert all(len(set(row)) == 4 for row in np.asarray(ids))


def test_group_limited_routing_stays_inside_the_chosen_groups(rng):
    logits = rng.normal(size=(128, 32)).astype(np.float32)
    _, ids = jep.route(jnp.asarray(logits), top_k=6, score="sigmoid", num_groups=8, topk_groups=2)
    groups_used = [len(set(row // 4)) for row in np.asarray(ids)]
    assert max(groups_used) <= 2


def test_bias_changes_the_choice_but_not_the_weights(rng):
    logits = rng.normal(size=(32, 8)).astype(np.float32)
    bias = np.zeros(8, np.float32)
    bias[3] = 100.0  # expert 3 always chosen
    weights, ids = jep.route(jnp.asarray(logits), top_k=2, score="sigmoid", bias=bias,
                             renormalize=False)
    assert np.all(np.asarray(ids)[:, 0] == 3)
    np.testing.assert_allclose(weights, np.take_along_axis(jax.nn.sigmoid(logits), ids, 1), rtol=1e-6)


def test_renormalized_weights_sum_to_one(rng):
    weights, _ = jep.route(jnp.asarray(rng.normal(size=(16, 8)), jnp.float32), top_k=3, score="sigmoid")
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)


def test_load_balancing_loss_is_one_when_uniform_and_grows_when_skewed():
    num_tokens, num_experts = 8, 4
    uniform_scores = jnp.full((num_tokens, num_experts), 1 / num_experts)
    uniform_ids = jnp.arange(num_tokens)[:, None] % num_experts
    np.testing.assert_allclose(jep.load_balancing_loss(uniform_scores, uniform_ids), 1.0, rtol=1e-6)
    skewed_scores = jnp.zeros((num_tokens, num_experts)).at[:, 0].set(1.0)
    skewed_ids = jnp.zeros((num_tokens, 1), jnp.int32)
    np.testing.assert_allclose(jep.load_balancing_loss(skewed_scores, skewed_ids), num_experts)


def test_load_balancing_loss_matches_the_switch_formula(rng):
    logits = jnp.asarray(rng.normal(size=(50, 6)), jnp.float32)
    scores = jep.router_scores(logits)
    _, ids = jep.route(logits, top_k=2)
    counts = np.bincount(np.asarray(ids).ravel(), minlength=6)
    want = 6 * np.sum(counts / (50 * 2) * np.asarray(scores).mean(0))
    np.testing.assert_allclose(jep.load_balancing_loss(scores, ids), want, rtol=1e-6)
    # Gradient flows through the scores only (counts are constants).
    grad = jax.grad(lambda s: jep.load_balancing_loss(s, ids))(scores)
    np.testing.assert_allclose(grad, np.broadcast_to(6 * counts / 100 / 50, (50, 6)), rtol=1e-6)


def test_router_z_loss_is_mean_squared_logsumexp(rng):
    logits = rng.normal(size=(10, 5)).astype(np.float32)
    want = np.mean(np.log(np.exp(logits).sum(-1)) ** 2)
    np.testing.assert_allclose(jep.router_z_loss(jnp.asarray(logits)), want, rtol=1e-5)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(top_k=0), ValueError, "top_k"),
    (dict(top_k=9), ValueError, "top_k"),
    (dict(num_groups=4), ValueError, "together"),
    (dict(num_groups=3, topk_groups=1), ValueError, "divide"),
    (dict(num_groups=4, topk_groups=5), ValueError, "topk_groups"),
    (dict(num_groups=4, topk_groups=1, top_k=3), ValueError, "exceeds"),
    (dict(score="relu"), ValueError, "score"),
    (dict(bias=jnp.zeros(7)), ValueError, "bias must have shape"),
    (dict(logits=jnp.zeros((4, 8, 1))), ValueError, "logits must have rank 2"),
    (dict(logits=jnp.zeros((4, 8), jnp.int32)), TypeError, "logits must be a floating"),
])
def test_route_bad_input_raises(kwargs, error, match):
    args = dict(logits=jnp.zeros((4, 8)), top_k=2) | kwargs
    with pytest.raises(error, match=match):
        jep.route(args.pop("logits"), **args)


def test_softmax_top_k_from_logits_equals_the_scores_path_with_gradients(rng):
    """Without bias or groups, renormalized softmax routing picks and weighs from the top-k
    logits alone; a zero bias takes the general path (all E scores): the same ids, weights and
    gradients."""
    logits = jnp.asarray(rng.normal(size=(64, 48)) * 3, jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(64, 5)), jnp.float32)

    def weighted(logits, bias):
        weights, ids = jep.route(logits, top_k=5, bias=bias)
        return jnp.sum(weights * cotangent), ids

    (fast, fast_ids), fast_grad = jax.value_and_grad(weighted, has_aux=True)(logits, None)
    (slow, slow_ids), slow_grad = jax.value_and_grad(weighted, has_aux=True)(
        logits, jnp.zeros(48, jnp.float32))
    np.testing.assert_array_equal(fast_ids, slow_ids)
    np.testing.assert_allclose(fast, slow, rtol=1e-6)
    np.testing.assert_allclose(fast_grad, slow_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("values", ["normal", "ties", "one expert and -inf", "int32"])
@pytest.mark.parametrize("num_experts, k", [(1024, 8), (4096, 8), (2048, 1), (1024, 3)])
def test_two_stage_top_k_equals_lax_top_k_with_ties_and_gradients(rng, values, num_experts, k):
    """Many experts take the two-stage top-k (blocks of 32 on the CPU, 16 on GPUs, then the
    best blocks): the same values and indices as lax.top_k, ties to the lower index, and the
    same gradient; jep.route with it picks what the per-token reference picks."""
    from jax import lax

    from jep.routing import _blocked_top_k, best_k

    if values == "normal":
        x = rng.normal(size=(37, num_experts))
    elif values in ("ties", "int32"):  # a handful of distinct values: ties inside and across blocks
        x = rng.integers(-2, 3, size=(37, num_experts)).astype(float)
    else:  # every token's best expert the same, the rest tied at 0 or -inf
        x = np.where(rng.random((37, num_experts)) < 0.3, -np.inf, 0.0)
        x[:, num_experts - 5] = 4.0
    x = jnp.asarray(x, jnp.int32 if values == "int32" else jnp.float32)
    want, want_ids = lax.top_k(x, k)
    for block in (16, 32):  # each platform's block, wherever the test runs
        got, got_ids = jax.jit(_blocked_top_k, static_argnums=(1, 2))(x, k, block)
        np.testing.assert_array_equal(got_ids, want_ids)
        np.testing.assert_array_equal(got, want)
    got, got_ids = jax.jit(best_k, static_argnums=1)(x, k)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_array_equal(got, want)
    assert got_ids.dtype == jnp.int32
    if values == "int32":
        return
    finite = jnp.where(jnp.isfinite(x), x, -1e30)
    weights = jnp.arange(1.0, k + 1)
    np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(best_k(v, k)[0] * weights))(finite),
                                  jax.grad(lambda v: jnp.sum(lax.top_k(v, k)[0] * weights))(finite))
    if values == "normal":
        _, ids = jep.route(x, top_k=k)
        _, want_route = jax.vmap(lambda l: reference.route_token(l, top_k=k))(np.asarray(x))
        np.testing.assert_array_equal(ids, want_route)
