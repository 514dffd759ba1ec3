"""The dispatch layout against a loop over tokens."""

import jax.numpy as jnp
import numpy as np
import pytest
from routings import KINDS, make_routing

from jep.layout import get_dispatch_layout


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
