"""Slow, obviously-correct references that the fast paths are tested against.

Written per token for clarity, not speed, with no sharding and no collectives; they run in the
dtype they are given, float64 included (under `jax.enable_x64`).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from jep.config import MoEConfig
from jep.experts import ACTIVATION_FNS


def route_token(logits, *, top_k, score="softmax", num_groups=None, topk_groups=None, bias=None,
                renormalize=True):
    """One token: f[E] logits -> (weights f[k], expert_ids i32[k]), by sorting.

    The same rule as `jep.route`: scores (softmax or sigmoid); the choice score adds `bias`; with
    groups, only the experts of the `topk_groups` groups with the best sum of their two best choice
    scores are eligible; the k best eligible experts win; their weights are the unbiased scores.
    """
    num_experts = logits.shape[0]
    scores = jax.nn.softmax(logits) if score == "softmax" else jax.nn.sigmoid(logits)
    choice = jax.lax.stop_gradient(scores if bias is None else scores + bias)
    if num_groups is not None:
        per_group = num_experts // num_groups
        groups = choice.reshape(num_groups, per_group)
        best_two = -jnp.sort(-groups, axis=1)[:, : min(2, per_group)].sum(1)
        chosen_groups = jnp.argsort(-best_two)[:topk_groups]
        in_chosen = jnp.isin(jnp.arange(num_experts) // per_group, chosen_groups)
        choice = jnp.where(in_chosen, choice, -jnp.inf)
    expert_ids = jnp.argsort(-choice)[:top_k].astype(jnp.int32)
    weights = scores[expert_ids]
    if renormalize:
        weights = weights / (weights.sum() + 1e-20)
    return weights, expert_ids


def expert(x, w_gate, w_up, w_down, activation="silu"):
    """One token through one SwiGLU expert: f[H] -> f[H]."""
    return (ACTIVATION_FNS[activation](x @ w_gate) * (x @ w_up)) @ w_down


def kept_slots(expert_ids, num_experts: int, capacity: int | None, num_chunks: int = 1):
    """bool[T, k]: which (token, slot) pairs a per-expert capacity keeps.

    Tokens are split into `num_chunks` equal consecutive chunks, each an independent set of
    competitors (one data-parallel group); inside a chunk an expert keeps its first `capacity`
    pairs in token order, then slot order.
    """
    if capacity is None:
        return jnp.ones(expert_ids.shape, bool)
    chunks = expert_ids.reshape(num_chunks, -1)
    one_hot = chunks[..., None] == jnp.arange(num_experts)  # [chunks, T/chunks * k, E]
    before = jnp.cumsum(one_hot, axis=1) - one_hot
    position = jnp.sum(before * one_hot, axis=-1)
    return (position < capacity).reshape(expert_ids.shape)


def moe(x, params: dict, *, config: MoEConfig, ep_size: int = 1, dp_size: int = 1):
    """The MoE layer token by token, unsharded: what `jep.moe` must equal.

    Args:
      x: f[..., H]; params and config as for `jep.moe`.
      ep_size, dp_size: the mesh `jep.moe` runs on (EP axis last); they only matter with a
        capacity, which applies per data-parallel group of tokens and per local expert.

    Returns:
      (y, aux) as `jep.moe`.
    """
    hidden = x.shape[-1]
    tokens = jnp.asarray(x).reshape(-1, hidden)
    num_experts, top_k = config.num_experts, config.top_k
    router = jnp.asarray(params["router"], x.dtype)
    bias = params.get("bias")
    logits = tokens @ router
    weights, expert_ids = jax.vmap(lambda l: route_token(
        l, top_k=top_k, score=config.score, num_groups=config.num_groups,
        topk_groups=config.topk_groups, bias=None if bias is None else jnp.asarray(bias, x.dtype),
        renormalize=config.renormalize))(logits)
    weights = weights * config.routed_scaling_factor

    tokens_per_rank = tokens.shape[0] // (ep_size * dp_size)
    capacity = config.dispatch.capacity_for(tokens_per_rank, top_k, num_experts // ep_size)
    kept = kept_slots(expert_ids, num_experts, capacity, num_chunks=dp_size)

    w_gate, w_up, w_down = (jnp.asarray(params[n], x.dtype) for n in ("w_gate", "w_up", "w_down"))

    def token_output(x_t, weights_t, ids_t, kept_t):
        y = jnp.zeros_like(x_t)
        for j in range(top_k):
            e = ids_t[j]
            out = expert(x_t, w_gate[e], w_up[e], w_down[e], config.activation)
            y = y + jnp.where(kept_t[j], weights_t[j] * out, 0)
        return y

    y = jax.vmap(token_output)(tokens, weights, expert_ids, kept)

    scores = jax.nn.softmax(logits) if config.score == "softmax" else jax.nn.sigmoid(logits)
    counts = jnp.zeros(num_experts, jnp.int32).at[expert_ids.reshape(-1)].add(1)
    fraction = counts / (tokens.shape[0] * top_k)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    aux = {
        "load_balancing_loss": num_experts * jnp.sum(fraction * scores.mean(0)),
        "router_z_loss": jnp.mean(log_z**2),
        "tokens_per_expert": counts,
        "num_dropped": jnp.sum(~kept).astype(jnp.int32),
    }
    return y.reshape(x.shape), aux


def dispatch(x, expert_ids, *, num_experts: int, capacity: int | None = None):
    """All ranks' dispatch at once, with loops (numpy).

    Args:
      x: [n, T, H], every rank's tokens; expert_ids: [n, T, k] (ids outside [0, E) are empty).

    Returns:
      recv_x: [n, C, H] what each rank receives (C as `jep.dispatch`), zeros past the rows;
      group_sizes: i32[n, E_local];
      owner: i32[n, C, 3], the (source rank, token, slot) behind each row, -1 for none;
      num_dropped: i32[n], pairs each rank could not keep.
    """
    x, expert_ids = np.asarray(x), np.asarray(expert_ids)
    num_ranks, num_tokens, top_k = expert_ids.shape
    per_rank = num_experts // num_ranks
    num_rows = (num_ranks * num_tokens * min(top_k, per_rank) if capacity is None
                else per_rank * capacity)
    recv_x = np.zeros((num_ranks, num_rows, x.shape[-1]), x.dtype)
    owner = np.full((num_ranks, num_rows, 3), -1, np.int32)
    group_sizes = np.zeros((num_ranks, per_rank), np.int32)
    num_dropped = np.zeros(num_ranks, np.int32)
    for rank in range(num_ranks):
        row = 0
        for local in range(per_rank):
            for source in range(num_ranks):
                for token in range(num_tokens):
                    for slot in range(top_k):
                        if expert_ids[source, token, slot] != rank * per_rank + local:
                            continue
                        if capacity is not None and group_sizes[rank, local] == capacity:
                            num_dropped[rank] += 1
                            continue
                        recv_x[rank, row] = x[source, token]
                        owner[rank, row] = (source, token, slot)
                        group_sizes[rank, local] += 1
                        row += 1
    return recv_x, group_sizes, owner, num_dropped


def combine(y, owner, weights):
    """The inverse of `dispatch` (numpy): out[s, t] = sum over rows owned by (s, t, j) of
    weights[s, t, j] * y[row]. y: [n, C, H], owner from `dispatch`, weights: [n, T, k]."""
    y, owner, weights = np.asarray(y), np.asarray(owner), np.asarray(weights)
    out = np.zeros(weights.shape[:2] + y.shape[-1:], np.result_type(y, weights))
    for rank in range(y.shape[0]):
        for row in range(y.shape[1]):
            source, token, slot = owner[rank, row]
            if source >= 0:
                out[source, token] += weights[source, token, slot] * y[rank, row]
    return out


__all__ = ["combine", "dispatch", "expert", "kept_slots", "moe", "route_token"]
