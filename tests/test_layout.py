"""Token layouts (sdlm/layout.py): ids, positions, labels and slots, written out by hand."""

import pytest
import torch

from sdlm.layout import (
    IGNORE,
    ar_step,
    block_start_candidates,
    confidence_step,
    sample_block_starts,
    speculative_step,
    training_layout,
)

M = 99  # mask id
X = torch.tensor([10, 11, 12, 13, 14, 15, 16, 17])
I = IGNORE


def test_training_layout_ids_positions_slots():
    lay = training_layout(X[:3], torch.ones(3, dtype=torch.bool), [1, 2], 2, M)
    assert lay.input_ids.tolist() == [10, 11, 12, 11, M, 12, M]
    assert lay.info.pos.tolist() == [0, 1, 2, 1, 2, 2, 3]  # blocks reuse the clean positions
    assert lay.info.block.tolist() == [-1, -1, -1, 0, 0, 1, 1]
    assert lay.info.start.tolist()[3:] == [1, 1, 2, 2]
    assert lay.slot.tolist() == [-1, -1, -1, 0, 1, 0, 1]
    assert lay.n_clean == 3
    # slot j of the block at p predicts x_{p+j+1}; nothing exists past x_2
    assert lay.block_labels.tolist() == [I, I, I, 12, I, I, I]


def test_labels_stop_at_the_end_of_the_response():
    # prompt x0..x3, response x4..x6 (x6 = end of turn), x7 belongs to the next turn
    loss = torch.tensor([0, 0, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    lay = training_layout(X, loss, [3, 5], 4, M)
    blocks = lay.block_labels[8:].view(2, 4).tolist()
    assert blocks[0] == [14, 15, 16, I]  # block at 3: x4 x5 x6, never x7 (not a target)
    assert blocks[1] == [16, I, I, I]  # block at 5: x6, then past the end
    # next-token labels for clean tokens whose next token is in the loss span; none on block tokens
    assert lay.ar_labels[:8].tolist() == [I, I, I, 14, 15, 16, I, I]
    assert (lay.ar_labels[8:] == I).all()


def test_labels_are_not_taken_from_a_later_turn():
    # a gap in the loss span (x4 is a user token): the block at 2 keeps x3 and ignores x5, x6 after the gap
    loss = torch.tensor([0, 0, 0, 1, 0, 1, 1, 0], dtype=torch.bool)
    lay = training_layout(X, loss, [2], 4, M)
    assert lay.block_labels[8:].tolist() == [13, I, I, I]


def test_training_layout_rejects_bad_input():
    with pytest.raises(ValueError):
        training_layout(X, torch.ones(8, dtype=torch.bool), [8], 2, M)
    with pytest.raises(ValueError):
        training_layout(X, torch.ones(8, dtype=torch.bool), [-1], 2, M)
    with pytest.raises(ValueError):
        training_layout(X, torch.ones(8, dtype=torch.bool), [1], 0, M)


def _training_layout_reference(ids, loss_mask, starts, D, mask_id):
    """The layout written block by block, slot by slot: the slow reference for the vectorised one."""
    L = ids.shape[0]
    out_ids, pos, blk, start, labels, slots = ids.tolist(), list(range(L)), [-1] * L, [-1] * L, [I] * L, [-1] * L
    for b, p in enumerate(starts):
        for j in range(D):
            out_ids.append(int(ids[p]) if j == 0 else mask_id)
            pos.append(p + j), blk.append(b), start.append(p), slots.append(j)
            ok = all(t < L and bool(loss_mask[t]) for t in range(p + 1, p + j + 2))
            labels.append(int(ids[p + j + 1]) if ok else I)
    return out_ids, pos, blk, start, labels, slots


@pytest.mark.parametrize("D", [1, 2, 4, 8])
def test_training_layout_equals_the_slot_by_slot_reference(D):
    g = torch.Generator().manual_seed(D)
    for trial in range(20):
        L = int(torch.randint(2, 40, (1,), generator=g))
        ids = torch.randint(0, 50, (L,), generator=g)
        loss = torch.rand(L, generator=g) < 0.7  # several spans with gaps: multi-turn
        starts = sorted(torch.randperm(L, generator=g)[: int(torch.randint(0, L, (1,), generator=g))].tolist())
        lay = training_layout(ids, loss, starts, D, M)
        r_ids, r_pos, r_blk, r_start, r_lab, r_slot = _training_layout_reference(ids, loss, starts, D, M)
        assert lay.input_ids.tolist() == r_ids
        assert lay.info.pos.tolist() == r_pos
        assert lay.info.block.tolist() == r_blk
        assert lay.info.start.tolist()[L:] == r_start[L:]
        assert lay.block_labels.tolist() == r_lab
        assert lay.slot.tolist() == r_slot
        assert lay.n_clean == L


def test_block_start_candidates_and_sampling():
    loss = torch.tensor([0, 0, 0, 1, 1, 1, 0, 0], dtype=torch.bool)
    # from the token just before the first response token (2) up to the last with a target (4)
    assert block_start_candidates(loss).tolist() == [2, 3, 4]
    g = torch.Generator().manual_seed(0)
    starts = sample_block_starts(loss, 2, g)
    assert len(starts) == 2 and starts == sorted(set(starts)) and set(starts) <= {2, 3, 4}
    assert sample_block_starts(loss, 10, g) == [2, 3, 4]  # capped, distinct, sorted


def test_ar_step():
    s = ar_step([5, 6, 7], 4)
    assert s.input_ids.tolist() == [5, 6, 7] and s.info.pos.tolist() == [4, 5, 6]
    assert s.info.block.tolist() == [-1, -1, -1] and s.n_logits == 1


def test_confidence_step():
    # committed x0..x5 with x0..x3 cached: uncached x4 x5, then the block [x5, M, M] at 5, 6, 7
    s = confidence_step([14, 15], 4, 3, M)
    assert s.input_ids.tolist() == [14, 15, 15, M, M]
    assert s.info.pos.tolist() == [4, 5, 5, 6, 7]
    assert s.info.block.tolist() == [-1, -1, 0, 0, 0]
    assert s.info.start.tolist()[2:] == [5, 5, 5]
    assert s.n_logits == 3


def test_speculative_step():
    # n = 6 (x5 uncached), drafts d0 d1 at 6, 7; blocks B0 at 5, B1 at 6, B2 at 7, D = 3
    s = speculative_step([15], 5, [20, 21], 3, M)
    assert s.input_ids.tolist() == [15, 20, 21, 15, M, M, 20, M, M, 21, M, M]
    assert s.info.pos.tolist() == [5, 6, 7, 5, 6, 7, 6, 7, 8, 7, 8, 9]
    assert s.info.block.tolist() == [-1, -1, -1, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert s.info.start.tolist()[3:] == [5, 5, 5, 6, 6, 6, 7, 7, 7]
    assert s.n_logits == 3 + 3 * 3  # causal logits at x5, d0, d1, then the three blocks
    # steady state size: |uncached| + k + (k+1) D = 1 + (D-1) + D*D = D^2 + D (SPEC §3.2)
    for D in (2, 4, 8):
        assert len(speculative_step([1], 9, [2] * (D - 1), D, M).input_ids) == D * D + D


def test_speculative_step_with_some_blocks():
    # the same step carrying only B2 (two drafts accepted), or no block at all
    s = speculative_step([15], 5, [20, 21], 3, M, blocks=[2])
    assert s.input_ids.tolist() == [15, 20, 21, 21, M, M]
    assert s.info.pos.tolist() == [5, 6, 7, 7, 8, 9]
    assert s.info.block.tolist() == [-1, -1, -1, 2, 2, 2] and s.info.start.tolist()[3:] == [7, 7, 7]
    assert s.n_logits == 3 + 3
    s = speculative_step([15], 5, [20, 21], 3, M, blocks=[0, 2])
    assert s.input_ids.tolist() == [15, 20, 21, 15, M, M, 21, M, M] and s.n_logits == 3 + 2 * 3
    s = speculative_step([15], 5, [20, 21], 3, M, blocks=[])
    assert s.input_ids.tolist() == [15, 20, 21] and s.n_logits == 3
    for bad in ([3], [1, 0], [1, 1], [-1]):
        with pytest.raises(ValueError, match="increasing accept lengths"):
            speculative_step([15], 5, [20, 21], 3, M, blocks=bad)
    # a tree step (two siblings) carrying the root's block and the second node's
    s = speculative_step([15], 5, [20, 21], 3, M, parents=[-1, -1], blocks=[0, 2])
    assert s.input_ids.tolist() == [15, 20, 21, 15, M, M, 21, M, M] and s.n_logits == 3 + 2 * 3
    assert s.info.pos.tolist() == [5, 6, 6, 5, 6, 7, 6, 7, 8] and s.visible.shape == (9, 9)
    assert not s.visible[6:, 1].any() and s.visible[6:, 2].all()  # node 1's block sees node 1, not node 0
    with pytest.raises(ValueError, match="increasing accept lengths"):
        speculative_step([15], 5, [20, 21], 3, M, parents=[-1, -1], blocks=[3])


def test_speculative_first_step_has_no_drafts():
    s = speculative_step([1, 2, 3], 0, [], 2, M)
    assert s.input_ids.tolist() == [1, 2, 3, 3, M]
    assert s.info.pos.tolist() == [0, 1, 2, 2, 3]
    assert s.n_logits == 1 + 2
