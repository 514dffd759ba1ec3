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
    scores, choice = _scores_and_choice(logits, score, num_groups, topk_groups, bias)
    expert_ids = jnp.argsort(-choice)[:top_k].astype(jnp.int32)
    weights = scores[expert_ids]
    if renormalize:
        weights = weights / (weights.sum() + 1e-20)
    return weights, expert_ids


def preference_token(logits, *, score="softmax", num_groups=None, topk_groups=None, bias=None):
    """One token: i32[E], every expert in the order `route_token` ranks them (best first)."""
    return jnp.argsort(-_scores_and_choice(logits, score, num_groups, topk_groups, bias)[1])


def _scores_and_choice(logits, score, num_groups, topk_groups, bias):
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
    return scores, choice


def overflow_pairs(policy: str, expert_ids, weights, preference, *, capacity: int,
                   num_experts: int, num_chunks: int = 1) -> np.ndarray:
    """i32[T, k]: where each (token, slot) pair ends up under a capacity policy (-1: dropped),
    pair by pair in plain numpy (see `jep.balance` for the rules).

    Tokens are split into `num_chunks` consecutive chunks (EP groups), each with its own
    capacity of `capacity` pairs per expert; a pair's position is its token, then its slot.
    `preference`: i32[T, E], each token's experts best first (`preference_token`).
    """
    ids = np.array(expert_ids, np.int64)
    weights, preference = np.asarray(weights), np.asarray(preference)
    num_tokens, top_k = ids.shape
    per_chunk = num_tokens // num_chunks
    for chunk in range(num_chunks):
        tokens = range(chunk * per_chunk, (chunk + 1) * per_chunk)
        pairs = [(t, j) for t in tokens for j in range(top_k) if 0 <= ids[t, j] < num_experts]
        if policy == "position":
            taken = np.zeros(num_experts, int)
            for t, j in pairs:
                taken[ids[t, j]] += 1
                if taken[ids[t, j]] > capacity:
                    ids[t, j] = -1
        elif policy == "probability":
            for e in range(num_experts):
                to_e = sorted((p for p in pairs if ids[p] == e), key=lambda p: -weights[p])
                for p in to_e[capacity:]:  # sorted() is stable: ties stay in position order
                    ids[p] = -1
        elif policy == "reroute":
            taken = np.zeros(num_experts, int)
            next_choice = {t: top_k for t in tokens}
            pending = pairs
            while pending:
                full = []
                for t, j in pending:
                    if taken[ids[t, j]] < capacity:
                        taken[ids[t, j]] += 1
                    else:
                        full.append((t, j))
                pending = []
                for t, j in full:  # each goes on to its token's next expert with room now
                    while (next_choice[t] < num_experts
                           and taken[preference[t, next_choice[t]]] >= capacity):
                        next_choice[t] += 1
                    if next_choice[t] < num_experts:
                        ids[t, j] = preference[t, next_choice[t]]
                        pending.append((t, j))
                    else:
                        ids[t, j] = -1
                    next_choice[t] += 1
        else:
            raise ValueError(f"unknown policy {policy!r}")
    return ids.astype(np.int32)


def expert(x, w_gate, w_up, w_down, activation="silu"):
    """One token through one SwiGLU expert: f[H] -> f[H]."""
    return (ACTIVATION_FNS[activation](x @ w_gate) * (x @ w_up)) @ w_down


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
    tokens_per_rank = tokens.shape[0] // (ep_size * dp_size)
    capacity = config.dispatch.capacity_for(tokens_per_rank, top_k, num_experts // ep_size)
    routed_ids = expert_ids
    if capacity is None:
        kept = jnp.ones(expert_ids.shape, bool)
    else:
        # The policy's decisions have no gradient: made in numpy, on values without one.
        preference = jax.vmap(lambda l: preference_token(
            l, score=config.score, num_groups=config.num_groups, topk_groups=config.topk_groups,
            bias=None if bias is None else jnp.asarray(bias, x.dtype)))(logits)
        decide = lambda ids, w, pref: overflow_pairs(  # noqa: E731
            config.dispatch.overflow, ids, w, pref, capacity=capacity, num_experts=num_experts,
            num_chunks=dp_size)
        expert_ids = jax.pure_callback(
            decide, jax.ShapeDtypeStruct(expert_ids.shape, jnp.int32),
            *(jax.lax.stop_gradient(a) for a in (expert_ids, weights, preference)))
        kept = expert_ids >= 0
        if config.dispatch.overflow == "reroute":
            scores = jax.nn.softmax(logits) if config.score == "softmax" else jax.nn.sigmoid(logits)
            weights = jnp.where(kept, jnp.take_along_axis(scores, jnp.maximum(expert_ids, 0), 1), 0)
            if config.renormalize:
                weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    weights = weights * config.routed_scaling_factor

    w_gate, w_up, w_down = (jnp.asarray(params[n], x.dtype) for n in ("w_gate", "w_up", "w_down"))

    def token_output(x_t, weights_t, ids_t, kept_t):
        y = jnp.zeros_like(x_t)
        for j in range(top_k):
            e = ids_t[j]
            out = expert(x_t, w_gate[e], w_up[e], w_down[e], config.activation)
            y = y + jnp.where(kept_t[j], weights_t[j] * out, 0)
        return y

    y = jax.vmap(token_output)(tokens, weights, expert_ids, kept)
    if "shared_gate" in params:  # the shared expert, on every token; Qwen2-MoE's gate on it
        shared = jax.vmap(lambda x_t: expert(x_t, *(jnp.asarray(params[n], x.dtype) for n in (
            "shared_gate", "shared_up", "shared_down")), config.activation))(tokens)
        if "shared_expert_gate" in params:
            shared = shared * jax.nn.sigmoid(tokens @ jnp.asarray(params["shared_expert_gate"],
                                                                  x.dtype))
        y = y + shared

    scores = jax.nn.softmax(logits) if config.score == "softmax" else jax.nn.sigmoid(logits)

    def balance_loss(scores, ids):
        counts = jnp.zeros(num_experts, jnp.int32).at[ids.reshape(-1)].add(1)
        return num_experts * jnp.sum(counts / ids.size * scores.mean(0))

    counts = jnp.zeros(num_experts, jnp.int32).at[routed_ids.reshape(-1)].add(1)
    sequence_length = x.shape[-2] if x.ndim >= 3 else tokens.shape[0]
    num_sequences = tokens.shape[0] // sequence_length
    per_sequence = [balance_loss(scores[s * sequence_length:(s + 1) * sequence_length],
                                 routed_ids[s * sequence_length:(s + 1) * sequence_length])
                    for s in range(num_sequences)]
    rank_load = counts.reshape(ep_size, -1).sum(1)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    aux = {
        "load_balancing_loss": balance_loss(scores, routed_ids),
        "sequence_load_balancing_loss": sum(per_sequence) / num_sequences,
        "router_z_loss": jnp.mean(log_z**2),
        "tokens_per_expert": counts,
        "expert_imbalance": counts.max() / counts.mean(),
        "rank_imbalance": rank_load.max() / rank_load.mean(),
        "num_dropped": jnp.sum(~kept).astype(jnp.int32),
        "num_rerouted": jnp.sum(kept & (expert_ids != routed_ids)).astype(jnp.int32),
    }
    return y.reshape(x.shape), aux


def dispatch(x, expert_ids, *, num_experts: int, capacity: int | None = None):
    """All ranks' dispatch at once, with loops (numpy).

    Args:
      x: [n, T, H], every rank's tokens; expert_ids: [n, T, k] (ids outside [0, E) are empty;
        an expert in several slots of a token gets one row, owned by the first of them).

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
                        if slot != first_slot(expert_ids[source, token], slot):
                            continue  # a repeat of this expert shares the first slot's row
                        if capacity is not None and group_sizes[rank, local] == capacity:
                            num_dropped[rank] += 1
                            continue
                        recv_x[rank, row] = x[source, token]
                        owner[rank, row] = (source, token, slot)
                        group_sizes[rank, local] += 1
                        row += 1
    return recv_x, group_sizes, owner, num_dropped


def first_slot(token_ids, slot: int) -> int:
    """The first slot of a token's ids naming the same expert as `slot`."""
    return next(j for j in range(slot + 1) if token_ids[j] == token_ids[slot])


def combine(y, owner, weights, expert_ids=None):
    """The inverse of `dispatch` (numpy): out[s, t] = sum over rows owned by (s, t, j) of
    weights[s, t, j] * y[row], y: [n, C, H], owner from `dispatch`, weights: [n, T, k]. With
    `expert_ids` ([n, T, k], as given to `dispatch`) a row's weight is the sum of the weights of
    every slot of its token naming its expert (one row stands for them all)."""
    y, owner, weights = np.asarray(y), np.asarray(owner), np.asarray(weights)
    out = np.zeros(weights.shape[:2] + y.shape[-1:], np.result_type(y, weights))
    for rank in range(y.shape[0]):
        for row in range(y.shape[1]):
            source, token, slot = owner[rank, row]
            if source < 0:
                continue
            if expert_ids is None:
                weight = weights[source, token, slot]
            else:
                ids = np.asarray(expert_ids)[source, token]
                weight = weights[source, token][ids == ids[slot]].sum()
            out[source, token] += weight * y[rank, row]
    return out


__all__ = ["combine", "dispatch", "expert", "first_slot", "moe", "overflow_pairs", "preference_token", "route_token"]
