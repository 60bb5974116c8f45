"""Batched decoding: many prompts through one forward pass per step, in every mode.

Each row of the batch runs exactly the step of :class:`sdlm.decode.Decoder` (the
same layouts, the same accept rule, its own generator): rows differ in how many
tokens they commit per step, so the steps are ragged. They are made rectangular
without touching any row's result:

- a step is ``[committed/draft tokens, padding | block tokens, padding]``: the
  causal part of every row is padded to the longest, then the blocks;
- padding, and the KV of what a row rejects (drafts that failed verification),
  stays in the shared cache as dead entries: their keys are marked with
  ``seq = -1`` in the mask (:func:`sdlm.masks.allowed`), so no real token ever
  attends to them, and each row's logical positions go on from its own length;
  a step's columns that no row keeps leave the cache at once, and a cache that is
  mostly dead is compacted (:func:`_compact`: each row's live entries moved to its end);
- the block part is the end of every row, so one crop removes all block KV.

A finished row leaves the batch (its cache rows are dropped), so short answers
cost nothing once done. With ``use_cache=False`` each step recomputes every row
from scratch, as the reference decoder does.

Greedy output equals decoding the prompts one at a time (in float32; the tests
check it for every mode). With sampling, row ``i`` uses its own generator seeded
like a lone decoder's, so it draws the same numbers too.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .accept import cut_at_eos
from .decode import Decoder, Generation
from .kvcache import dropped_of, layer_offset, trimmed
from .masks import TokenInfo, allowed


@dataclass
class _Row:
    index: int
    ids: list[int]
    n_prompt: int
    max_new: int
    generator: torch.Generator
    first: int = 0  # committed tokens whose KV is in the cache
    drafts: list[int] = field(default_factory=list)
    draft_q: torch.Tensor | None = None
    text_before: str = ""
    forwards: int = 0
    hist: Counter = field(default_factory=Counter)


def generate_batch(
    decoder: Decoder,
    prompts: Sequence[Sequence[int]],
    batch_size: int = 16,
    progress: bool = False,
) -> list[Generation]:
    """Decode ``prompts`` (token ids) ``batch_size`` at a time; one :class:`Generation` each, in order.

    Prompts of similar length share a batch. A generation's ``seconds`` is the
    wall time of the batch it ran in (the rows ran together).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for p in prompts:
        decoder._check_prompt(len(p))
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), desc="generate", unit="prompt", dynamic_ncols=True)
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        for i, gen in zip(chunk, _run(decoder, [prompts[i] for i in chunk])):
            results[i] = gen
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return results  # type: ignore[return-value]


def _generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is not None:
        g.manual_seed(seed)
    else:
        g.seed()
    return g


def _run(decoder: Decoder, prompts: Sequence[Sequence[int]]) -> list[Generation]:
    cfg, sdlm = decoder.config, decoder.sdlm
    start = time.perf_counter()
    rows = [
        _Row(i, [int(t) for t in p], len(p), decoder._max_new(len(p)), _generator(cfg.seed))
        for i, p in enumerate(prompts)
    ]
    done: list[Generation | None] = [None] * len(rows)
    cache = decoder._new_cache() if cfg.use_cache else None
    pad_id = sdlm.tokenizer.pad_token_id if sdlm.tokenizer.pad_token_id is not None else 0
    causal_within_block = sdlm.config.causal_within_block if sdlm.config else False
    # what the cache holds, per row: positions and which entries are real (alive) KV
    k_pos = torch.zeros((len(rows), 0), dtype=torch.long)
    k_alive = torch.zeros((len(rows), 0), dtype=torch.bool)
    active = list(rows)

    while active:
        steps, uncached, n_causal = [], [], []
        for r in active:
            first = r.first if cfg.use_cache else 0
            u = r.ids[first:]
            if cfg.drafting:
                remaining = r.max_new - (len(r.ids) - r.n_prompt)
                r.drafts = decoder._trim_drafts(r.drafts, remaining)  # the bonus token needs one slot of the budget
                if r.draft_q is not None:
                    r.draft_q = r.draft_q[: len(r.drafts)]
            st = decoder._layout(u, first, r.drafts, r.draft_q)
            steps.append(st)
            uncached.append(u)
            n_causal.append(len(u) + (len(r.drafts) if cfg.drafting else 0))
        B = len(active)
        C = max(n_causal)
        K = max(len(st.input_ids) - c for st, c in zip(steps, n_causal))
        T = C + K
        ids = torch.full((B, T), pad_id, dtype=torch.long)
        pos = torch.zeros((B, T), dtype=torch.long)
        blk = torch.full((B, T), -1, dtype=torch.long)
        bstart = torch.full((B, T), -1, dtype=torch.long)
        seq = torch.full((B, T), -1, dtype=torch.long)
        read: list[torch.Tensor] = []  # per row: the columns of its n_logits logits
        columns: list[torch.Tensor] = []  # per row: where its step tokens sit
        for b, (st, c) in enumerate(zip(steps, n_causal)):
            cols = _columns(st, c, C)
            columns.append(cols)
            ids[b, cols] = st.input_ids
            pos[b, cols] = st.info.pos
            blk[b, cols] = st.info.block
            bstart[b, cols] = st.info.start
            seq[b, cols] = 0
            read.append(cols[-st.n_logits :])
        q = TokenInfo(pos, blk, bstart, seq)
        if cache is not None:
            past = TokenInfo(k_pos, torch.full_like(k_pos, -1), torch.full_like(k_pos, -1),
                             torch.where(k_alive, 0, -1))
            keys = TokenInfo.cat([past, q])
        else:
            keys = q
        dev = sdlm.device
        ok = allowed(q.to(dev), keys.to(dev), causal_within_block)  # (B, T, S+T)
        S = ok.shape[-1] - T
        for b, st in enumerate(steps):
            if st.visible is not None:  # a draft tree: each row hides the nodes of other branches
                cols = columns[b].to(dev)
                ok[b, cols[:, None], S + cols[None, :]] &= st.visible.to(dev)
        dropped = None
        if cache is not None and sdlm.cache_kinds is not None:  # windowed layers: the columns no row can see
            sdlm.trim(cache, torch.tensor([r.first for r in active]), k_alive, k_pos)
            dropped = dropped_of(cache)
        # (B, 1, T, S+T), or one per kind of layer
        mask = sdlm.masks(ok, q.pos.to(dev), keys.pos.to(dev), dropped=dropped)
        need = torch.unique(torch.cat(read))  # sorted: the LM head runs on these columns only
        if sdlm._takes_logits_to_keep:
            logits = sdlm.forward(ids, pos, mask, q.is_block, cache, need.to(dev))
        else:
            logits = sdlm.forward(ids, pos, mask, q.is_block, cache)[:, need.to(dev)]
        logits = logits.float()  # stays on the device: each row's accept rule runs there, as a lone decoder's does
        if cache is not None:
            sdlm.crop(cache, K)  # every row's blocks (KV over masks) and block padding

        alive_now = torch.zeros((B, C), dtype=torch.bool)
        finished = []
        for b, r in enumerate(active):
            first = r.first if cfg.use_cache else 0
            lg = logits[b, torch.searchsorted(need, read[b]).to(dev)]
            out = decoder._accept(lg, uncached[b], first, r.drafts, r.draft_q, r.generator, steps[b].blocks)
            if out.kept_drafts is None:
                alive_now[b, : out.keep - first] = True  # the committed and accepted draft tokens of this step
            else:  # a draft tree: the step's uncached tokens and the accepted nodes (the rest stays dead)
                u = len(uncached[b])
                alive_now[b, :u] = True
                alive_now[b, [u + i for i in out.kept_drafts]] = True
            r.first, r.drafts, r.draft_q = out.keep, out.drafts, out.draft_q
            remaining = r.max_new - (len(r.ids) - r.n_prompt)
            new, reason = cut_at_eos(out.tokens, decoder.eos_ids, remaining)
            if cfg.stop:
                new, r.text_before, stopped = decoder._cut_at_stop(r.ids[r.n_prompt :], new, r.text_before)
                reason = "stop" if stopped else reason
            r.ids.extend(new)
            r.forwards += 1
            r.hist[len(new)] += 1
            if reason is not None:
                toks = r.ids[r.n_prompt :]
                done[r.index] = Generation(r.n_prompt, toks, decoder.decode_text(toks), r.forwards,
                                           time.perf_counter() - start, reason, dict(r.hist))
                finished.append(b)
        if cache is not None:  # this step's causal columns, less those no row keeps (rejected drafts, padding)
            kept = alive_now.any(0).nonzero().flatten()
            if len(kept) < C:
                sdlm.keep_tail(cache, k_pos.shape[1], kept.tolist())
            k_pos = torch.cat([k_pos, pos[:, :C][:, kept]], 1)
            k_alive = torch.cat([k_alive, alive_now[:, kept]], 1)
        if finished:
            keep_rows = [b for b in range(B) if b not in finished]
            active = [active[b] for b in keep_rows]
            if cache is not None and active:
                idx = torch.tensor(keep_rows)
                _select_rows(cache, idx.to(sdlm.device))
                k_pos, k_alive = k_pos[idx], k_alive[idx]
                k_pos, k_alive = _trim_dead_columns(cache, k_pos, k_alive)
        if cache is not None and active and k_alive.shape[1] >= COMPACT_MIN and \
                int(k_alive.sum(1).max()) < COMPACT_BELOW * k_alive.shape[1]:  # it shrinks by half at least
            k_pos, k_alive = _compact(cache, k_pos, k_alive)
    seconds = time.perf_counter() - start
    for g in done:
        g.seconds = seconds  # type: ignore[union-attr]
    return done  # type: ignore[return-value]


def _columns(st, c: int, C: int) -> torch.Tensor:
    """Where a row's step tokens sit in the batch: its ``c`` causal tokens first, its blocks from column ``C``."""
    return torch.cat([torch.arange(c), torch.arange(C, C + len(st.input_ids) - c)])


def _select_rows(cache, idx: torch.Tensor) -> None:
    """Keep rows ``idx`` of a transformers cache (``batch_select_indices``, transformers 4.38+ and 5)."""
    cache.batch_select_indices(idx)


COMPACT_MIN = 64
"""Cache columns from which a batch's cache is compacted (:func:`_compact`) ..."""
COMPACT_BELOW = 0.5
"""... when the row with the most live entries has fewer than this share of its columns: each compaction at
least halves the width, so rows of unequal lengths (padding) never compact step after step."""


def _compact(cache, k_pos: torch.Tensor, k_alive: torch.Tensor):
    """Move each row's live cache entries, in order, to the end of a cache as wide as the row with the most
    of them; the rest of a row is dead padding at the front. Columns that some rows rejected and others
    kept (ragged acceptance) otherwise stay for every row. A layer whose first entries were dropped (a
    window's, :func:`sdlm.kvcache.drop_front`) gets zeros for them, dead to its mask (behind its window),
    and drops them again at the next step. Returns the new ``k_pos``, ``k_alive``."""
    B = k_alive.shape[0]
    width = int(k_alive.sum(1).max())
    src = torch.full((B, width), -1, dtype=torch.long)  # new column -> old column, -1: padding
    for b in range(B):
        live = k_alive[b].nonzero().flatten()
        src[b, width - len(live):] = live
    alive = src >= 0
    pos = torch.where(alive, k_pos.gather(1, src.clamp(min=0)), torch.zeros_like(src))
    for i, layer in enumerate(cache.layers):
        if getattr(layer, "keys", None) is None or layer.keys.dim() != 4:
            continue
        at = (src - layer_offset(cache, i)).to(layer.keys.device)  # the layer's own columns
        here = (at >= 0)[:, None, :, None]
        for name in ("keys", "values"):
            x = getattr(layer, name)
            g = at.clamp(min=0)[:, None, :, None].expand(B, x.shape[1], width, x.shape[-1])
            setattr(layer, name, torch.where(here, x.gather(2, g), torch.zeros((), dtype=x.dtype, device=x.device)))
    if (t := trimmed(cache)) is not None:
        t.dropped = {}
    return pos, alive


def _trim_dead_columns(cache, k_pos: torch.Tensor, k_alive: torch.Tensor):
    """Drop cache columns that are dead in every remaining row at the end (padding of longer rows)."""
    alive_any = k_alive.any(0)
    n = int(alive_any.shape[0])
    last = int(torch.nonzero(alive_any).max()) + 1 if bool(alive_any.any()) else 0
    if last < n:
        from .model import _crop

        _crop(cache, n - last)
        return k_pos[:, :last], k_alive[:, :last]
    return k_pos, k_alive
