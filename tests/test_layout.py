"""The dispatch layout against a loop over tokens."""

import jax.numpy as jnp
import numpy as np
import pytest
from routings import KINDS, make_routing

from jep.layout import arrival_places, get_dispatch_layout


@pytest.mark.parametrize("num_ranks, top_k", [(1, 2), (4, 1), (4, 3), (8, 4)])
@pytest.mark.parametrize("kind", KINDS)
def test_layout_matches_a_loop_over_tokens(rng, kind, num_ranks, top_k):
    num_tokens, num_experts = 9, 2 * num_ranks
    ids = make_routing(kind, rng, num_ranks=num_ranks, num_tokens=num_tokens, top_k=top_k,
                       num_experts=num_experts)[0]
    layout = get_dispatch_layout(jnp.asarray(ids), num_experts=num_experts, num_ranks=num_ranks)
    per_rank = num_experts // num_ranks

    in_rank = np.zeros((num_tokens, num_ranks), bool)
    for t in range(num_tokens):
        for e in ids[t]:
            if 0 <= e < num_experts:
                in_rank[t, e // per_rank] = True
    send = [(r, t) for r in range(num_ranks) for t in range(num_tokens) if in_rank[t, r]]
    num_rows = num_tokens * min(top_k, num_ranks)

    np.testing.assert_array_equal(layout.is_token_in_rank, in_rank)
    np.testing.assert_array_equal(layout.tokens_per_rank, in_rank.sum(0))
    np.testing.assert_array_equal(
        layout.tokens_per_expert, np.bincount(ids[ids >= 0], minlength=num_experts))
    np.testing.assert_array_equal(layout.send_offsets, np.cumsum(in_rank.sum(0)) - in_rank.sum(0))
    np.testing.assert_array_equal(layout.send_token, [t for _, t in send] + [num_tokens] * (num_rows - len(send)))
    np.testing.assert_array_equal(layout.send_rank, [r for r, _ in send] + [num_ranks] * (num_rows - len(send)))
    for t in range(num_tokens):
        seen = set()
        for j, e in enumerate(ids[t]):
            if not 0 <= e < num_experts:
                assert layout.slot_send_row[t, j] == num_rows and not layout.slot_is_first[t, j]
                continue
            rank = e // per_rank
            assert layout.slot_send_row[t, j] == send.index((rank, t))
            assert layout.slot_is_first[t, j] == (rank not in seen)
            seen.add(rank)


def test_tokens_per_rank_counts_a_token_once_per_rank():
    # Top-8 of 256 experts on 4 ranks: 8 slots, but at most 4 rows per token.
    ids = jnp.asarray(np.arange(8, dtype=np.int32)[None] * 32)  # experts 0, 32, ..., 224
    layout = get_dispatch_layout(ids, num_experts=256, num_ranks=4)
    np.testing.assert_array_equal(layout.tokens_per_rank, [1, 1, 1, 1])
    assert layout.send_token.shape == (4,)


@pytest.mark.parametrize("count, num_experts", [(1, 4), (256, 8), (1000, 64), (700, 4096)])
def test_arrival_places_count_earlier_pairs_to_the_same_expert(rng, count, num_experts):
    """Places without a sort (the dispatch plan's rows, the reroute rounds): for each pair,
    the earlier pairs to its expert (num_experts: to none); and each expert's arrivals. Random
    pairs, and a third of them to one expert; blocks of 256 pairs, the last one partial."""
    for experts in (rng.integers(0, num_experts + 1, size=count),
                    np.where(np.arange(count) < count // 3, 1, rng.integers(0, num_experts + 1,
                                                                          size=count))):
        place, counts = arrival_places(jnp.asarray(experts, jnp.int32), num_experts)
        want = [np.sum(experts[:i] == experts[i]) for i in range(count)]
        np.testing.assert_array_equal(place, want)
        np.testing.assert_array_equal(counts, np.bincount(experts, minlength=num_experts + 1))
