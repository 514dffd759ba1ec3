"""Routings for tests: random, and the skewed cases every fast path must survive."""

import numpy as np

KINDS = ("random", "one_expert", "empty_rank", "empty_slots")
# Ids a router does not give but a caller may: an expert repeated within a token, ids >= E.
CALLER_KINDS = ("repeated_experts", "ids_past_e")


def make_routing(kind, rng, *, num_ranks, num_tokens, top_k, num_experts):
    """i32[n, T, k] expert ids, for `KINDS` distinct within a token (empty slots are -1).

    random: uniform; one_expert: every token's first slot is expert 0 (the rest follow it, so with
    k=1 all tokens go to one expert and every other expert is empty); empty_rank: no token picks
    an expert of the last rank; empty_slots: random with about a third of the slots empty.
    Not distinct (`CALLER_KINDS`): repeated_experts: about half the slots repeat the token's
    first expert; ids_past_e: about a third of the slots hold ids in [E, 2E).
    """
    shape = (num_ranks, num_tokens)
    per_rank = num_experts // num_ranks
    if kind == "one_expert":
        ids = np.broadcast_to(np.arange(top_k), shape + (top_k,))
    else:
        pool = num_experts - per_rank if kind == "empty_rank" and num_ranks > 1 else num_experts
        pool = max(pool, top_k)
        ids = np.argsort(rng.random(shape + (pool,)), axis=-1)[..., :top_k]
        if kind == "empty_slots":
            ids = np.where(rng.random(ids.shape) < 0.33, -1, ids)
        if kind == "repeated_experts":
            ids = np.where(rng.random(ids.shape) < 0.5, ids[..., :1], ids)
        if kind == "ids_past_e":
            ids = np.where(rng.random(ids.shape) < 0.33, ids + num_experts, ids)
    return np.ascontiguousarray(ids, dtype=np.int32)
