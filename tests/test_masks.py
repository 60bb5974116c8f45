"""The block attention rule (SPEC §2), checked on small matrices written out by hand.

Token order in every layout below: the clean tokens c0 c1 c2 (positions 0, 1, 2), then the
blocks in order. Rows are queries, columns keys; 1 = may attend.
"""

import pytest
import torch

from sdlm.layout import training_layout
from sdlm.masks import TokenInfo, additive, allowed

IDS = torch.tensor([10, 11, 12])
MASK = 99


def rule(block_starts, D, causal_within_block=False):
    lay = training_layout(IDS, torch.ones(3, dtype=torch.bool), block_starts, D, MASK)
    return allowed(lay.info, lay.info, causal_within_block).int().tolist()


def test_two_blocks_of_two():
    # blocks A = [x1, M] at positions 1, 2 (start 1) and B = [x2, M] at positions 2, 3 (start 2)
    expected = [
        # c0 c1 c2 A0 A1 B0 B1
        [1, 0, 0, 0, 0, 0, 0],  # c0: causal
        [1, 1, 0, 0, 0, 0, 0],  # c1
        [1, 1, 1, 0, 0, 0, 0],  # c2: never a block key
        [1, 0, 0, 1, 1, 0, 0],  # A0: clean keys at positions < 1, all of A (not c1: seen through A0)
        [1, 0, 0, 1, 1, 0, 0],  # A1: same view as A0 (bidirectional block)
        [1, 1, 0, 0, 0, 1, 1],  # B0: clean keys at positions < 2, all of B, never A
        [1, 1, 0, 0, 0, 1, 1],  # B1
    ]
    assert rule([1, 2], 2) == expected


def test_two_blocks_of_three():
    # A = [x0, M, M] at positions 0..2 (start 0: sees no clean key), B = [x2, M, M] at 2..4 (start 2)
    expected = [
        # c0 c1 c2 A0 A1 A2 B0 B1 B2
        [1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 1, 1, 1],
        [1, 1, 0, 0, 0, 0, 1, 1, 1],
        [1, 1, 0, 0, 0, 0, 1, 1, 1],
    ]
    assert rule([0, 2], 3) == expected


def test_causal_within_block():
    # same layout as above; inside a block a slot now sees only itself and earlier slots
    expected = [
        # c0 c1 c2 A0 A1 A2 B0 B1 B2
        [1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 1, 0, 0],
        [1, 1, 0, 0, 0, 0, 1, 1, 0],
        [1, 1, 0, 0, 0, 0, 1, 1, 1],
    ]
    assert rule([0, 2], 3, causal_within_block=True) == expected


def test_d1_block_is_next_token_view():
    # D = 1: the block [x_p] at position p sees clean keys < p and itself: the causal view of x_p
    expected = [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 0],
        [1, 1, 0, 1],  # block at start 2
    ]
    assert rule([2], 1) == expected


def test_seq_separates_packed_samples():
    # sample 0: clean tokens at positions 0, 1; sample 1: clean tokens at positions 0, 1 and a
    # block [x1, M] at positions 1, 2. Position-based causality alone would let sample 1 see sample 0.
    pos = torch.tensor([0, 1, 0, 1, 1, 2])
    blk = torch.tensor([-1, -1, -1, -1, 0, 0])
    start = torch.tensor([-1, -1, -1, -1, 1, 1])
    seq = torch.tensor([0, 0, 1, 1, 1, 1])
    expected = [
        # s0c0 s0c1 s1c0 s1c1 s1B0 s1B1
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 0, 1, 1],
        [0, 0, 1, 0, 1, 1],
    ]
    info = TokenInfo(pos, blk, start, seq)
    assert allowed(info, info).int().tolist() == expected
    # without seq the samples leak into each other (this is why packing needs it)
    leaky = allowed(TokenInfo(pos, blk, start), TokenInfo(pos, blk, start)).int().tolist()
    assert leaky[2][0] == 1 and leaky[4][0] == 1


def test_queries_against_cached_keys():
    # inference: 3 cached clean keys + a new block [x2, M] at positions 2, 3 (the confidence step view)
    keys = TokenInfo.cat([TokenInfo.clean(torch.arange(3)), TokenInfo(torch.tensor([2, 3]), torch.zeros(2, dtype=torch.long), torch.full((2,), 2))])
    q = TokenInfo(torch.tensor([2, 3]), torch.zeros(2, dtype=torch.long), torch.full((2,), 2))
    assert allowed(q, keys).int().tolist() == [[1, 1, 0, 1, 1], [1, 1, 0, 1, 1]]


def test_batched_fields():
    # leading batch dimensions broadcast: (B, T) fields -> (B, T, T)
    info = TokenInfo.clean(torch.arange(3).repeat(2, 1))
    m = allowed(info, info)
    assert m.shape == (2, 3, 3)
    assert torch.equal(m[0], torch.tril(torch.ones(3, 3, dtype=torch.bool)))


def test_cat_fills_missing_seq_with_zero():
    a = TokenInfo.clean(torch.arange(2))
    b = TokenInfo(torch.arange(2), torch.full((2,), -1), torch.full((2,), -1), torch.tensor([1, 1]))
    assert TokenInfo.cat([a, b]).seq.tolist() == [0, 0, 1, 1]
    assert TokenInfo.cat([a, a]).seq is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_additive_mask(dtype):
    m = torch.tensor([[True, False], [True, True]])
    out = additive(m, dtype)
    assert out.shape == (1, 1, 2, 2) and out.dtype == dtype
    assert out[0, 0, 0, 0] == 0 and out[0, 0, 1, 1] == 0
    assert out[0, 0, 0, 1] == torch.finfo(dtype).min
    assert additive(m[None].repeat(3, 1, 1), dtype).shape == (3, 1, 2, 2)


@pytest.mark.parametrize("causal_within_block", [False, True])
@pytest.mark.parametrize("with_seq", [False, True])
def test_flex_block_mask_is_the_same_rule(causal_within_block, with_seq):
    """The flex-attention BlockMask evaluates the same rule as :func:`allowed` (shared prefixes included),
    over lengths that are not multiples of its tiles, with queries against a longer key list; hidden
    tiles are dropped."""
    from torch.nn.attention.flex_attention import create_mask

    from sdlm.masks import block_mask

    g = torch.Generator().manual_seed(3)
    B, Tq, Tk = 2, 150, 290
    rand = lambda lo, hi, T: torch.randint(lo, hi, (B, T), generator=g)  # noqa: E731
    # seq: samples 0 and 1, padding (-1) and a shared prefix (SHARED, -2)
    k = TokenInfo(rand(0, 90, Tk), rand(-1, 4, Tk), rand(0, 90, Tk), rand(-2, 2, Tk) if with_seq else None)
    q = TokenInfo(k.pos[:, -Tq:], k.block[:, -Tq:], k.start[:, -Tq:], None if k.seq is None else k.seq[:, -Tq:])
    bm = block_mask(q, k, causal_within_block, block_size=64)
    assert bm.shape == (B, 1, Tq, Tk)
    dense = create_mask(bm.mask_mod, B, 1, Tq, Tk, device="cpu")[:, 0]
    assert torch.equal(dense, allowed(q, k, causal_within_block))
    # a layout where whole tiles are hidden: clean tokens never see the block part after them
    lay = training_layout(torch.arange(100), torch.ones(100, dtype=torch.bool), list(range(0, 96, 4)), 4, MASK)
    info = TokenInfo(*(t[None] for t in (lay.info.pos, lay.info.block, lay.info.start)))
    sparse = block_mask(info, info, block_size=64)
    assert sparse.sparsity() > 0
    assert torch.equal(create_mask(sparse.mask_mod, 1, 1, len(lay.info), len(lay.info), device="cpu")[:, 0],
                       allowed(info, info))


def test_shared_prefix_is_seen_by_every_sample_and_sees_only_itself():
    """``seq`` SHARED marks a prefix held once for a row's samples: every sample's clean and block tokens
    see it under the usual rules (causal; blocks only before their start), it sees only itself, and
    padding (seq -1) neither sees it nor is seen."""
    from sdlm.masks import SHARED

    # shared prefix at positions 0, 1; sample 0: clean 2, 3; sample 1: clean 2; a block of sample 1 at 2; a pad
    pos = torch.tensor([0, 1, 2, 3, 2, 2, 3, 0])
    block = torch.tensor([-1, -1, -1, -1, -1, 0, 0, -1])
    start = torch.tensor([-1, -1, -1, -1, -1, 2, 2, -1])
    seq = torch.tensor([SHARED, SHARED, 0, 0, 1, 1, 1, -1])
    info = TokenInfo(pos, block, start, seq)
    ok = allowed(info, info)
    assert ok[0].tolist() == [True, False, False, False, False, False, False, False]
    assert ok[1, :2].all() and not ok[1, 2:].any()
    assert ok[3].tolist() == [True, True, True, True, False, False, False, False]
    assert ok[4].tolist() == [True, True, False, False, True, False, False, False]
    assert ok[6].tolist() == [True, True, False, False, False, True, True, False]  # a block sees clean pos < 2
    assert ok[7].tolist() == [False] * 7 + [True] and not ok[:7, 7].any()
