"""Exact tokens per forward from one forward pass (SPEC §3.4).

For greedy lossless decoding the accept lengths are a function of the greedy
output ``y`` and of the block predictions along it: the block that starts at
position ``p`` sees the committed tokens before ``p`` (which are ``y``'s, since
every accepted token equals ``y``) and its own slot 0 ``s_p``. So one forward
over ``prompt + y`` with a block at every position gives every draft the
decoder could ever have had; replaying the accept rule over them gives the
decoder's forward count without decoding.

Cost: one forward of ``len(prompt) + len(y) * (D + 1)`` tokens per prompt, for
any draft length ``D``. The test suite checks the count against the real
decoder at D = 2, 4, 8, with the chain of drafts and with draft trees
(:mod:`sdlm.tree`: the blocks' ranked predictions replace the argmax).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch

from .errors import SDLMError
from .masks import TokenInfo, allowed
from .model import SDLM

if TYPE_CHECKING:
    from .tree import DraftTree


@dataclass
class TPF:
    """Replayed speculative decoding of one prompt."""

    new_tokens: int
    forwards: int
    accept_histogram: dict[int, int] = field(default_factory=dict)
    offered: list[int] = field(default_factory=list)
    """The chain: drafts offered by each step after the first (a step with ``k`` holds ``1 + k + (k + 1) * D``
    tokens, or ``1 + k + b * D`` where it carries ``b`` candidate blocks); a tree: its nodes per step."""
    blocks: list[int] = field(default_factory=list)
    """Candidate blocks carried by each step after the first (``offered + 1`` unless a block threshold)."""

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / max(self.forwards, 1)


@torch.no_grad()
def _block_logits(sdlm: SDLM, seq: Sequence[int], first: int, block_size: int, chunk: int = 64):
    """Yield (k, D, V) float logits of the blocks that start at ``first .. len(seq)-2``, ``chunk``
    blocks at a time (the mask token suppressed). The clean sequence runs once and fills the cache."""
    from transformers import DynamicCache

    if sdlm.config is None:
        raise SDLMError("the model has no mask token: retrofit it (or load an SDLM) before measuring drafts")
    D, mask_id = block_size, sdlm.config.mask_token_id
    ids = torch.tensor([int(t) for t in seq], dtype=torch.long)
    n = ids.shape[0]
    starts = list(range(first, n - 1))
    if not starts:
        return
    clean = TokenInfo.clean(torch.arange(n))
    cache = DynamicCache()
    mask = sdlm.masks(allowed(clean, clean), clean.pos, clean.pos)
    sdlm.forward(ids[None], clean.pos[None], mask, clean.is_block[None], cache, 1)
    for c in range(0, len(starts), chunk):
        ps = torch.tensor(starts[c : c + chunk])
        k = ps.shape[0]
        bid = torch.arange(k).repeat_interleave(D)
        start = ps.repeat_interleave(D)
        pos = start + torch.arange(D).repeat(k)
        block_ids = torch.full((k, D), mask_id, dtype=torch.long)
        block_ids[:, 0] = ids[ps]
        info = TokenInfo(pos, bid, start)
        keys = TokenInfo.cat([clean, info])
        mask = sdlm.masks(allowed(info, keys, sdlm.config.causal_within_block), info.pos, keys.pos)
        keep = torch.arange(k * D)
        logits = sdlm.forward(block_ids.flatten()[None], pos[None], mask, info.is_block[None], cache, keep)[0]
        SDLM.crop(cache, k * D)
        logits = logits.float()
        logits[:, mask_id] = float("-inf")
        yield logits.view(k, D, -1)


def block_drafts(sdlm: SDLM, seq: Sequence[int], first: int, block_size: int, chunk: int = 64) -> torch.Tensor:
    """Greedy predictions of the blocks that start at ``first .. len(seq)-2``.

    Returns (n_blocks, D) token ids: row ``i`` is the block at ``p = first + i``,
    column ``j`` its slot ``j`` prediction for position ``p + j + 1`` (the mask
    token is never predicted, as in the decoder). The clean sequence runs once
    (it fills the cache); blocks run ``chunk`` at a time against it.
    """
    out = [lg.argmax(-1).cpu() for lg in _block_logits(sdlm, seq, first, block_size, chunk)]
    return torch.cat(out) if out else torch.empty((0, block_size), dtype=torch.long)


def block_drafts_and_probs(sdlm: SDLM, seq: Sequence[int], first: int, block_size: int,
                           chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`block_drafts` and each prediction's probability (the slot's top probability), (n_blocks, D)
    each: what a draft threshold (:attr:`sdlm.decode.GenerationConfig.draft_threshold`) reads."""
    toks, probs = block_topk_and_probs(sdlm, seq, first, block_size, 1, chunk)
    return toks[..., 0], probs[..., 0]


def block_topk(sdlm: SDLM, seq: Sequence[int], first: int, block_size: int, k: int, chunk: int = 64) -> torch.Tensor:
    """Like :func:`block_drafts`, the ``k`` best predictions of every slot, best first: (n_blocks, D, k)."""
    out = [lg.topk(k, -1).indices.cpu() for lg in _block_logits(sdlm, seq, first, block_size, chunk)]
    return torch.cat(out) if out else torch.empty((0, block_size, k), dtype=torch.long)


def block_topk_and_probs(sdlm: SDLM, seq: Sequence[int], first: int, block_size: int, k: int,
                         chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`block_topk` and the probability of each ranked prediction, (n_blocks, D, k) each: what a draft
    tree's threshold reads (:meth:`sdlm.tree.DraftTree.likely_nodes`)."""
    toks, probs = [], []
    for lg in _block_logits(sdlm, seq, first, block_size, chunk):
        idx = lg.topk(k, -1).indices  # ranked as :func:`block_topk` and the decoder rank them
        toks.append(idx.cpu())
        probs.append(lg.softmax(-1).gather(-1, idx).cpu())
    if not toks:
        return torch.empty((0, block_size, k), dtype=torch.long), torch.empty((0, block_size, k))
    return torch.cat(toks), torch.cat(probs)


def replay(drafts: torch.Tensor, seq: Sequence[int], n_prompt: int, max_new_tokens: int | None = None,
           tree: "DraftTree | None" = None, top_probs: torch.Tensor | None = None,
           draft_threshold: float = 0.0, block_threshold: float = 0.0) -> TPF:
    """Replay SPEC §3.2's greedy accept rule over precomputed block drafts.

    ``seq`` is prompt + greedy output; ``drafts`` from :func:`block_drafts`
    with ``first = n_prompt - 1``. ``max_new_tokens`` is the decoder's limit
    (default: the output length), which bounds the drafts near the end.
    With a draft ``tree`` (:mod:`sdlm.tree`), ``drafts`` are ranked predictions
    (n_blocks, D, K) from :func:`block_topk` with K >= the tree's widest slot.
    With a ``draft_threshold`` > 0, a step offers only the drafts the decoder offers under it:
    the chain, :func:`sdlm.decode.likely_drafts` of ``top_probs`` (from :func:`block_drafts_and_probs`);
    a tree, :meth:`sdlm.tree.DraftTree.likely_nodes` of ``top_probs`` (the ranked predictions'
    probabilities, from :func:`block_topk_and_probs`).
    With a ``block_threshold`` > 0, a step carries only the candidate blocks the decoder carries under it
    (the chain: :func:`sdlm.decode.likely_accept_lengths`; a tree: :meth:`sdlm.tree.DraftTree.likely_ends`,
    from ``top_probs``), and a step whose accepted drafts had no block offers no drafts.
    """
    from .decode import likely_accept_lengths, likely_drafts
    from .tree import tree_accept

    seq = [int(t) for t in seq]
    N = len(seq) - n_prompt
    if N <= 0:
        return TPF(0, 0)
    limit = max_new_tokens if max_new_tokens is not None else N
    D = drafts.shape[1]
    if (draft_threshold > 0 or block_threshold > 0) and top_probs is None:
        raise ValueError("a draft or block threshold is replayed from the drafts' probabilities: pass top_probs")
    if tree is not None:
        if drafts.dim() != 3 or drafts.shape[2] < max(tree.widths, default=1):
            raise ValueError(f"a tree of widths {tree.widths} needs ranked drafts (n, D, K >= {max(tree.widths)})")
    hist: Counter[int] = Counter({1: 1})  # the prefill forward commits one token
    gen, forwards, offered, carried = 1, 1, [], []
    m = n_prompt  # position of the newest committed (bonus) token
    has_block = True  # whether the previous step carried the block its accept length needed
    while gen < N:
        k = min(D - 1, limit - gen - 1) if has_block else 0
        if tree is None:
            b = m - 1 - (n_prompt - 1)
            if draft_threshold > 0:  # the decoder keeps the likely prefix of the block's D - 1 drafts
                k = min(k, likely_drafts(top_probs[b, 1:], draft_threshold))
            d = drafts[b, 1 : 1 + k].tolist()  # block at p = m-1, slots 1..k
            a = 0
            while a < k and m + 1 + a < len(seq) and d[a] == seq[m + 1 + a]:
                a += 1
            lengths = (likely_accept_lengths(top_probs[b, 1 : 1 + k].tolist(), block_threshold) if block_threshold > 0
                       else range(k + 1))  # the accept lengths whose candidate block the step carries
            carried.append(len(lengths))
            has_block = a in lengths
        else:
            b = m - 1 - (n_prompt - 1)
            row = drafts[b]  # (D, K): slot j's ranked predictions
            nodes = range(tree.nodes_within(k))  # the tree cut at the depth the length limit leaves
            if draft_threshold > 0:  # and only the nodes likely enough, as the decoder offers them
                nodes = [i for i in tree.likely_nodes(top_probs[b, 1:].tolist(), draft_threshold) if i < len(nodes)]
            every = tree.node_tokens([row[j].tolist() for j in range(1, D)])
            toks = [every[i] for i in nodes]
            # node at depth j drafts position m + j; the greedy target after the root (position m) and
            # after a node at depth j is the answer's token one further on (-1 past its end)
            targets = [seq[m + 1 + d] if m + 1 + d < len(seq) else -1 for d in [0] + [tree.depths[i] for i in nodes]]
            path = tree_accept(tree.parents_of(nodes), toks, targets)
            a = len(path)
            if block_threshold > 0:  # the anchors whose candidate block the step carries
                joint = tree.joint_probs(top_probs[b, 1:].tolist())
                ends = tree.likely_ends(nodes, [joint[i] for i in nodes], block_threshold)
            else:
                ends = range(len(nodes) + 1)
            carried.append(len(ends))
            has_block = (path[-1] + 1 if path else 0) in ends
            k = len(nodes)
        offered.append(k)
        new = min(a + 1, N - gen)
        gen, m, forwards = gen + new, m + new, forwards + 1
        hist[new] += 1
    return TPF(N, forwards, dict(hist), offered, carried)


def tokens_per_forward(
    sdlm: SDLM, prompt_ids: Sequence[int], output_ids: Sequence[int], block_size: int, max_new_tokens: int | None = None,
    tree: "DraftTree | None" = None, draft_threshold: float = 0.0, block_threshold: float = 0.0,
) -> TPF:
    """The greedy speculative decoder's forward count for ``prompt -> output``, from one forward.

    ``output_ids`` must be the model's greedy output for ``prompt_ids`` (with the
    block-gated adapter: the base model's); then the count is exact. With a draft
    ``tree``, the count of the tree decoder (``GenerationConfig(tree=...)``). With a
    ``draft_threshold``, the count of the decoder under it (0: every draft or node offered); with a
    ``block_threshold``, under that too (0: every candidate block carried).
    """
    seq = list(prompt_ids) + list(output_ids)
    first = len(prompt_ids) - 1
    probs = None
    if tree is None and (draft_threshold > 0 or block_threshold > 0):
        drafts, probs = block_drafts_and_probs(sdlm, seq, first, block_size)
    elif tree is None:
        drafts = block_drafts(sdlm, seq, first, block_size)
    else:
        K = max(max(tree.widths, default=1), 1)
        if draft_threshold > 0 or block_threshold > 0:
            drafts, probs = block_topk_and_probs(sdlm, seq, first, block_size, K)
        else:
            drafts = block_topk(sdlm, seq, first, block_size, K)
    return replay(drafts, seq, len(prompt_ids), max_new_tokens, tree, top_probs=probs, draft_threshold=draft_threshold,
                  block_threshold=block_threshold)


def summarize(results: list[TPF]) -> dict:
    """Pooled tokens per forward (total tokens / total forwards) and the mean per prompt."""
    tok = sum(r.new_tokens for r in results)
    fw = sum(r.forwards for r in results)
    per = [r.tokens_per_forward for r in results if r.forwards]
    return {
        "tokens_per_forward": tok / max(fw, 1),
        "mean_tokens_per_forward": sum(per) / max(len(per), 1),
        "new_tokens": tok,
        "forwards": fw,
        "prompts": len(results),
    }
