"""Token layouts: where every token sits, which position it takes, what it predicts.

Pure tensor functions; the only place where off-by-one decisions live.

Notation (SPEC §2-3): committed tokens ``x_0 .. x_{n-1}``; ``M`` is the mask
token; a block of size ``D`` that starts at position ``p`` is
``[x_p, M x (D-1)]`` at positions ``p .. p+D-1`` and its slot ``j`` predicts
``x_{p+j+1}``. Slot 0 is therefore the ordinary next-token task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .masks import TokenInfo

IGNORE = -100


def block(first_token: int, start: int, block_size: int, mask_token_id: int, block_id: int) -> tuple[torch.Tensor, TokenInfo]:
    """One block ``[first_token, M x (D-1)]`` at positions ``start .. start+D-1``."""
    ids = torch.full((block_size,), mask_token_id, dtype=torch.long)
    ids[0] = first_token
    pos = torch.arange(start, start + block_size)
    return ids, TokenInfo(pos, torch.full_like(pos, block_id), torch.full_like(pos, start))


# ---------------------------------------------------------------- training


@dataclass
class TrainingLayout:
    """Clean sequence followed by K appended blocks; all fields have shape (T,) with T = L + K*D."""

    input_ids: torch.Tensor
    info: TokenInfo
    block_labels: torch.Tensor  # target of each block slot, IGNORE elsewhere
    slot: torch.Tensor  # slot index 0..D-1 of block tokens, -1 for clean tokens
    ar_labels: torch.Tensor  # next token for clean tokens whose next token is in the loss span, IGNORE elsewhere
    n_clean: int


def block_start_candidates(loss_mask: torch.Tensor) -> torch.Tensor:
    """Positions ``p`` where a block may start: its slot 0 target ``x_{p+1}`` carries loss.

    This is "from the token just before the first response token up to the
    last response token that still has a target" (SPEC §2).
    """
    return torch.nonzero(loss_mask[1:], as_tuple=False).flatten()  # index i means p = i (target i+1)


def sample_block_starts(loss_mask: torch.Tensor, n_blocks: int, generator: torch.Generator | None = None) -> list[int]:
    """Draw ``n_blocks`` distinct block starts from the loss span, sorted."""
    cand = block_start_candidates(loss_mask)
    n = min(n_blocks, len(cand))
    pick = torch.randperm(len(cand), generator=generator)[:n]
    return sorted(cand[pick].tolist())


def training_layout(
    ids: torch.Tensor,
    loss_mask: torch.Tensor,
    block_starts: Sequence[int],
    block_size: int,
    mask_token_id: int,
) -> TrainingLayout:
    """Build ``[x_0 .. x_{L-1}] ++ [x_{p1}, M x (D-1)] ++ ... ++ [x_{pK}, M x (D-1)]``.

    ids: (L,) token ids; loss_mask: (L,) bool, True on tokens that are targets
    (assistant responses incl. their end-of-turn token, or all of a plain text).
    Slot ``j`` of a block at ``p`` gets the label ``x_{p+j+1}`` only if every
    token ``x_{p+1} .. x_{p+j+1}`` is in the loss span: targets past the end
    of a response are ignored, never taken from the next turn.
    """
    L, D = ids.shape[0], block_size
    if D < 1:
        raise ValueError("block_size must be >= 1")
    loss_mask = loss_mask.bool()
    p = torch.as_tensor(list(block_starts), dtype=torch.long).reshape(-1)  # (K,)
    K = p.shape[0]
    if K and (int(p.min()) < 0 or int(p.max()) >= L):
        bad = int(p[(p < 0) | (p >= L)][0])
        raise ValueError(f"block start {bad} outside the sequence of length {L}")
    j = torch.arange(D)
    # all K blocks at once: block b is [x_{p_b}, M x (D-1)] at positions p_b .. p_b+D-1
    b_ids = torch.full((K, D), mask_token_id, dtype=torch.long)
    b_ids[:, 0] = ids[p]
    b_pos = p[:, None] + j  # (K, D)
    b_block = torch.arange(K)[:, None].expand(K, D)
    b_start = p[:, None].expand(K, D)
    # slot j targets x_{p+j+1}, kept only while every target up to it is in the loss span
    t = b_pos + 1
    in_span = (t < L) & loss_mask[t.clamp(max=L - 1)]
    keep = torch.cumprod(in_span.long(), dim=1).bool()
    b_labels = torch.where(keep, ids[t.clamp(max=L - 1)], torch.full_like(t, IGNORE))

    T = L + D * K
    ar_labels = torch.full((T,), IGNORE, dtype=torch.long)
    ar_labels[: L - 1] = torch.where(loss_mask[1:], ids[1:], torch.full_like(ids[1:], IGNORE))
    blocks = TokenInfo(b_pos.reshape(-1), b_block.reshape(-1), b_start.reshape(-1))
    info = TokenInfo.cat([TokenInfo.clean(torch.arange(L)), blocks])
    block_labels = torch.cat([torch.full((L,), IGNORE, dtype=torch.long), b_labels.reshape(-1)])
    slot = torch.cat([torch.full((L,), -1, dtype=torch.long), j.repeat(K)])
    return TrainingLayout(torch.cat([ids, b_ids.reshape(-1)]), info, block_labels, slot, ar_labels, L)


# ---------------------------------------------------------------- inference


@dataclass
class StepLayout:
    """The new tokens of one decoding forward (fields (T,)) and which logits the step reads.

    The step needs the logits of the last ``n_logits`` tokens only.
    """

    input_ids: torch.Tensor
    info: TokenInfo
    n_logits: int
    visible: torch.Tensor | None = None
    """(T, T) bool over the step's own tokens, AND-ed with the block rule: draft trees hide the
    nodes of other branches (:func:`sdlm.tree.tree_visibility`). None: no restriction."""
    blocks: list[int] | None = None
    """A speculative step: the candidate blocks it carries, in order (accept lengths; a tree's anchors, 0 the
    root and ``i + 1`` draft ``i``). None for the other steps."""


def ar_step(uncached: Sequence[int], first_pos: int) -> StepLayout:
    """Plain causal step: the uncached committed tokens at ``first_pos ..``; read the last logit."""
    ids = torch.tensor(list(uncached), dtype=torch.long)
    return StepLayout(ids, TokenInfo.clean(torch.arange(first_pos, first_pos + len(ids))), 1)


def confidence_step(
    uncached: Sequence[int], first_pos: int, block_size: int, mask_token_id: int, causal_first: bool = False
) -> StepLayout:
    """SPEC §3.1: uncached committed tokens, then one block ``[x_{n-1}, M x (D-1)]`` at ``n-1``.

    Reads the D block logits; slot j predicts ``x_{n+j}``. With ``causal_first`` it reads D + 1:
    the causal logit at ``x_{n-1}`` (the model's own prediction of ``x_n``), then the block's.
    """
    clean = ar_step(uncached, first_pos)
    n = first_pos + len(uncached)
    bids, binfo = block(int(clean.input_ids[-1]), n - 1, block_size, mask_token_id, 0)
    n_logits = block_size + 1 if causal_first else block_size
    return StepLayout(torch.cat([clean.input_ids, bids]), TokenInfo.cat([clean.info, binfo]), n_logits)


def speculative_step(
    uncached: Sequence[int], first_pos: int, drafts: Sequence[int], block_size: int, mask_token_id: int,
    parents: Sequence[int] | None = None, blocks: Sequence[int] | None = None,
) -> StepLayout:
    """SPEC §3.2: uncached committed tokens, drafts ``d_0..d_{k-1}`` as causal tokens, then
    k+1 candidate blocks ``B_i = [token at n+i-1, M x (D-1)]`` at positions ``n+i-1 ..``.

    Reads ``(k+1) + (k+1)*D`` logits: the causal logits at ``x_{n-1}, d_0 .. d_{k-1}``
    (the AR targets ``t_0 .. t_k``) followed by the blocks ``B_0 .. B_k``.

    With ``parents`` (a draft tree, :mod:`sdlm.tree`) draft ``i`` is a tree node whose parent is
    draft ``parents[i]`` (-1: the last committed token); it sits one position after its parent and
    sees only its ancestors among the drafts. ``B_0`` then starts at ``x_{n-1}`` and ``B_{i+1}`` at
    draft ``i``; the logits are read in the same order.

    With ``blocks`` (increasing: accept lengths, or with a tree 0 for ``B_0`` and ``i + 1`` for draft ``i``'s)
    the step carries only those candidate blocks, in that order, and reads ``(k+1) + len(blocks)*D`` logits
    (:attr:`sdlm.decode.GenerationConfig.block_threshold`).
    """
    if parents is not None:
        return _tree_step(uncached, first_pos, drafts, block_size, mask_token_id, parents, blocks)
    clean = ar_step(list(uncached) + list(drafts), first_pos)
    n = first_pos + len(uncached)
    k = len(drafts)
    blocks = _carried(blocks, k)
    parts_ids, parts_info = [clean.input_ids], [clean.info]
    for i in blocks:
        # B_i starts at the token in position n+i-1: x_{n-1} for i = 0, d_{i-1} after.
        first = int(clean.input_ids[len(uncached) - 1 + i])
        bids, binfo = block(first, n + i - 1, block_size, mask_token_id, i)
        parts_ids.append(bids)
        parts_info.append(binfo)
    return StepLayout(torch.cat(parts_ids), TokenInfo.cat(parts_info), (k + 1) + len(blocks) * block_size,
                      blocks=blocks)


def _carried(blocks: Sequence[int] | None, k: int) -> list[int]:
    """The candidate blocks a step with ``k`` drafts carries: ``blocks``, checked, or all ``k + 1``."""
    blocks = list(range(k + 1) if blocks is None else blocks)
    if any(not 0 <= i <= k for i in blocks) or any(a >= b for a, b in zip(blocks, blocks[1:])):
        raise ValueError(f"candidate blocks {blocks} must be increasing accept lengths (or tree anchors) in 0..{k}")
    return blocks


def _tree_step(uncached, first_pos, drafts, block_size, mask_token_id, parents, blocks=None) -> StepLayout:
    from .tree import tree_visibility

    k = len(drafts)
    blocks = _carried(blocks, k)
    if len(parents) != k:
        raise ValueError(f"{k} drafts need {k} parents, got {len(parents)}")
    u = len(uncached)
    n = first_pos + u
    depth: list[int] = []
    for p in parents:
        if not -1 <= p < len(depth):
            raise ValueError("a draft's parent must come before it (breadth-first order)")
        depth.append(1 if p < 0 else depth[p] + 1)
    pos = torch.cat([torch.arange(first_pos, n), n - 1 + torch.tensor(depth, dtype=torch.long)])
    ids = torch.tensor(list(uncached) + list(drafts), dtype=torch.long)
    parts_ids, parts_info = [ids], [TokenInfo.clean(pos)]
    anchors = [(int(ids[u - 1]), n - 1)] + [(int(d), n - 1 + depth[i]) for i, d in enumerate(drafts)]
    for b in blocks:
        tok, start = anchors[b]
        bids, binfo = block(tok, start, block_size, mask_token_id, b)
        parts_ids.append(bids)
        parts_info.append(binfo)
    vis = tree_visibility(parents, u, block_size)
    if len(blocks) < k + 1:  # the rows and columns of the blocks carried
        keep = list(range(u + k)) + [u + k + b * block_size + j for b in blocks for j in range(block_size)]
        vis = vis[keep][:, keep]
    return StepLayout(torch.cat(parts_ids), TokenInfo.cat(parts_info), (k + 1) + len(blocks) * block_size, vis,
                      blocks)
