"""Matching in batches of whole blocks: every pair once, each batch among few photos, sized by pace."""

from __future__ import annotations

import itertools

from scandrop.pipeline.sparse.reconstruct_sparse import (
    MATCH_BATCH_SECONDS,
    MATCH_BLOCK,
    _batches,
    pair_blocks,
)


def test_blocks_hold_every_pair_once_and_few_photos_each() -> None:
    names = [f"view_{i:03d}.png" for i in range(24)]
    pairs = list(itertools.combinations(names, 2))
    blocks = pair_blocks(pairs)
    assert sorted(p for b in blocks for p in b) == sorted(pairs)
    assert max(len(b) for b in blocks) == MATCH_BLOCK**2
    assert max(len({n for p in b for n in p}) for b in blocks) == 2 * MATCH_BLOCK


def test_batches_join_blocks_up_to_the_time_budget() -> None:
    pairs = list(itertools.combinations([f"{i:03d}" for i in range(24)], 2))
    blocks = pair_blocks(pairs)
    slow = list(_batches(blocks, lambda: float("inf")))
    assert slow == blocks  # unknown pace: a block at a time
    fast = list(_batches(blocks, lambda: MATCH_BATCH_SECONDS / 100))  # 100 pairs fit the budget
    assert all(len(b) <= 100 for b in fast) and len(fast) < len(blocks)
    assert [p for b in fast for p in b] == [p for b in blocks for p in b]
