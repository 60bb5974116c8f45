"""Gathered attention: a training pass's attention over only the keys its queries may see, in a few
batched dense calls (for GPUs).

A packed training row puts several samples side by side, so a dense kernel computes every query
against every key of the row, and the block rule (:mod:`sdlm.masks`) throws most of those scores
away: a block sees the clean keys of its own sample before its start and its own D tokens, nothing
of the other samples and nothing of the other blocks. Over the default GPU recipe's rows of 1024
tokens, 18% of the block pass's dense scores and 25% of the clean pass's are seen
(``bench/attention_work.py``), and 13% of the tokens the linear layers run on are padding.

:func:`gathered` cuts a pass's real queries (padding is left out) into chunks of ``chunk`` consecutive
queries of one sample, and gives each chunk exactly the keys that some query of it may see (the union
of their rows of the rule's mask), in column order: for a chunk of blocks, the shared prefix, its
sample's clean keys up to its last block's start, and its own blocks' tokens; for a chunk of clean
tokens, the prefix and its sample's clean tokens up to the chunk's last one. Those keys are looked
for among the chunk's own sample's columns and the shared prefix only, so a row's length costs
nothing: the training step puts a whole micro-batch in one row, without padding. Chunks of about the same
key count are grouped into a few *buckets*, each padded to one width (a multiple of ``align``; the
padding keys are masked). :func:`gathered_attention` then runs one sdpa call per bucket, the chunks as
its batch, with the chunk's own mask (the rule, read from the same :func:`sdlm.masks.allowed`).

Grouped-query heads share their keys without copies: the g query heads of a key/value head are stacked
as rows of one call (``(n, Hkv, g·chunk, d)`` queries over ``(n, Hkv, W, d)`` keys), so the keys are
gathered once per key/value head and the mask is the only thing repeated g times.

The softmax of each query then runs over exactly the keys it sees, as under the dense mask, so the
outputs and gradients are those of sdpa with the dense mask up to float rounding (tested); padding
queries get zeros (nothing reads them). A model runs it through
:func:`sdlm.attention.use_gathered_attention`; the training step (``attention: gather``) builds the
layouts.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import SDLMError
from .masks import TokenInfo, allowed

CHUNK = 64
"""Queries per chunk (:func:`gathered`): 16 blocks of 4, or 64 clean tokens."""
ALIGN = 16
"""Bucket widths are multiples of this (the memory-efficient kernel reads masks in aligned rows)."""
MAX_BUCKETS = 6
"""The most sdpa calls per layer: chunks are grouped into at most this many widths."""


@dataclass
class Bucket:
    """``n`` chunks of :attr:`Gathered.chunk` queries over ``width`` keys each."""

    q_idx: torch.Tensor
    """(n·chunk,) the flat query column (row · Tq + column) of each chunk slot; a chunk's spare slots
    repeat its first query (their outputs are dropped)."""
    k_idx: torch.Tensor
    """(n·width,) the flat key column (row · Tk + column) of each chunk's keys, in column order, then
    padding (any column, masked)."""
    seen: torch.Tensor
    """(n, chunk, width) True where the slot's query may see the key (False for padding keys)."""
    n: int
    width: int
    masks: dict = field(default_factory=dict, repr=False)
    """(dtype, g) -> the (n, 1, g·chunk, width) additive mask, made once for every layer of the pass."""

    def mask(self, dtype: torch.dtype, g: int) -> torch.Tensor:
        """The additive mask of the bucket's stacked rows (g query heads of ``chunk`` rows each), on the
        device of the layout."""
        key = (dtype, g)
        if key not in self.masks:
            C = self.seen.shape[1]
            m = torch.zeros(self.n, 1, g, C, self.width, dtype=dtype, device=self.seen.device)  # (n, 1, g, C, W)
            m.masked_fill_(~self.seen[:, None, None], torch.finfo(dtype).min)
            self.masks[key] = m.view(self.n, 1, g * C, self.width)
        return self.masks[key]


@dataclass
class Gathered:
    """A pass's attention as chunks of queries over the keys they see (:func:`gathered`)."""

    buckets: list[Bucket]
    out_idx: torch.Tensor
    """(B·Tq,) for each query column, its row in the buckets' outputs joined in order (each bucket
    ``n·chunk`` rows); padding columns point one past the last row, at a row of zeros."""
    chunk: int
    shape: tuple[int, int, int]
    """(B, Tq, Tk): the batch rows, query columns and key columns the layout was made for."""
    kv_only_layer: int | None = None
    """As :attr:`sdlm.attention.CausalSegments.kv_only_layer`: a pass run for its KV cache only stops once
    this layer's keys and values are cached (:func:`sdlm.attention.fill_cache`)."""

    def to(self, device) -> "Gathered":
        return self

    def scores(self) -> int:
        """Scores one query head computes per layer: the sum over buckets of chunks × chunk × width."""
        return sum(b.n * self.chunk * b.width for b in self.buckets)


def gathered(q: TokenInfo, k: TokenInfo, causal_within_block: bool = False, chunk: int = CHUNK,
             align: int = ALIGN, max_buckets: int = MAX_BUCKETS) -> Gathered:
    """The :class:`Gathered` layout of queries ``q`` (fields (B, Tq)) over keys ``k`` (fields (B, Tk)) of
    the same rows under the block rule. Queries with ``seq`` -1 (padding) are left out. With ``seq`` on
    both sides (packed samples) a chunk's keys are looked for only among its own sample's columns and the
    row's shared prefix, so the work does not grow with the row's length: a whole micro-batch can be one
    row. Made where the fields are (on a GPU with a few host syncs, for the sizes of its index tensors)."""
    if chunk < 1 or align < 1 or max_buckets < 1:
        raise SDLMError(f"gathered attention needs chunk, align and max_buckets >= 1 (got {chunk}, {align}, "
                        f"{max_buckets})")
    B, Tq = q.pos.shape
    Tk = k.pos.shape[1]
    dev = q.pos.device
    packed = q.seq is not None and k.seq is not None
    q_seq = q.seq if packed else torch.zeros(B, Tq, dtype=torch.long, device=dev)  # unpacked: a row is one sample
    k_seq = k.seq if packed else torch.zeros(B, Tk, dtype=torch.long, device=dev)
    flat = torch.nonzero((q_seq != -1).flatten()).flatten()  # (M,) the real query columns, row by row
    M = flat.numel()
    if M == 0:
        raise SDLMError("gathered attention got no real query (every query column is padding)")

    # consecutive queries of one row and one sample form runs; runs are cut into chunks of ``chunk``
    S = Tq + Tk + 3  # more than any seq + 2 (seq >= -2, SHARED): (row, seq) -> row * S + seq + 2
    group = flat // Tq * S + q_seq.flatten()[flat] + 2
    i = torch.arange(M, device=dev)
    new_run = torch.ones(M, dtype=torch.bool, device=dev)
    new_run[1:] = group[1:] != group[:-1]
    in_run = i - torch.cummax(torch.where(new_run, i, 0), 0).values
    new_chunk = new_run | (in_run % chunk == 0)
    cid = torch.cumsum(new_chunk.long(), 0) - 1  # (M,) the chunk of each real query
    slot = i - torch.cummax(torch.where(new_chunk, i, 0), 0).values  # (M,) its place in the chunk
    first = flat[new_chunk]  # (N,) each chunk's first query
    N = first.numel()
    q_idx = first[:, None].repeat(1, chunk)  # (N, chunk): spare slots repeat the first query
    q_idx[cid, slot] = flat

    # candidate keys of a chunk: its row's shared prefix, then its own sample's key columns (in column order)
    k_flat = torch.nonzero((k_seq != -1).flatten()).flatten()  # (K,) the real key columns
    k_group = k_flat // Tk * S + k_seq.flatten()[k_flat] + 2
    order = torch.sort(k_group, stable=True).indices
    k_sorted, g_sorted = k_flat[order], k_group[order]  # the keys grouped by (row, seq), each group in column order
    own = group[new_chunk]  # (N,) each chunk's (row, seq) group
    shared = first // Tq * S  # (N,) its row's shared prefix (seq SHARED = -2)
    own_at, own_n = _group_span(g_sorted, own)
    sh_at, sh_n = _group_span(g_sorted, shared)
    sh_n = torch.where(own == shared, 0, sh_n)  # a chunk of the prefix itself: its own group is the prefix
    P, G = (int(x) for x in torch.stack([sh_n.max(), own_n.max()]).tolist())  # one sync
    j = torch.arange(P + G, device=dev)
    at = torch.where(j < P, sh_at[:, None] + j, own_at[:, None] + j - P)  # (N, P + G) places in k_sorted
    cand_ok = torch.where(j < P, j < sh_n[:, None], j - P < own_n[:, None])
    cand = k_sorted[at.clamp(max=k_sorted.numel() - 1)]  # (N, P + G) flat key columns
    sub = lambda t, idx: t.flatten()[idx]  # noqa: E731
    ok = allowed(TokenInfo(sub(q.pos, q_idx), sub(q.block, q_idx), sub(q.start, q_idx), sub(q_seq, q_idx)),
                 TokenInfo(sub(k.pos, cand), sub(k.block, cand), sub(k.start, cand), sub(k_seq, cand)),
                 causal_within_block) & cand_ok[:, None, :]  # (N, chunk, P + G): each slot's row of the mask
    union = ok.any(1)  # (N, P + G): the candidates some query of the chunk sees
    counts = union.sum(1)  # (N,)

    host_counts = counts.tolist()  # one sync; the buckets are chosen on the host
    widths = _bucket_widths(host_counts, align, max_buckets)
    members: list[list[int]] = [[] for _ in widths]
    for c, x in enumerate(host_counts):  # each chunk to the narrowest bucket that holds it
        members[bisect.bisect_left(widths, x)].append(c)
    buckets, out_pos = [], torch.empty(N, dtype=torch.long, device=dev)
    done = 0
    for W, ids in zip(widths, members):
        n = len(ids)
        if n == 0:
            continue
        ids = torch.tensor(ids, device=dev)
        # the seen candidates first, in column order (a stable sort of "not seen"), then others as padding
        cols = torch.sort((~union[ids]).to(torch.uint8), dim=1, stable=True).indices[:, :W]  # (n, W)
        if cols.shape[1] < W:  # fewer candidates than the width: pad with the first (masked)
            cols = torch.cat([cols, cols.new_zeros(n, W - cols.shape[1])], 1)
        valid = torch.arange(W, device=dev)[None] < counts[ids, None]  # (n, W)
        seen = ok[ids].gather(2, cols[:, None, :].expand(n, chunk, W)) & valid[:, None, :]  # (n, chunk, W)
        buckets.append(Bucket(q_idx[ids].flatten(), cand[ids].gather(1, cols).flatten(), seen, n, W))
        out_pos[ids] = torch.arange(done, done + n, device=dev)
        done += n
    out_idx = torch.full((B * Tq,), done * chunk, dtype=torch.long, device=dev)
    out_idx[flat] = out_pos[cid] * chunk + slot
    return Gathered(buckets, out_idx, chunk, (B, Tq, Tk))


def _group_span(sorted_groups: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each of ``groups`` starts in ``sorted_groups`` and how many entries it has there (0 if none)."""
    at = torch.searchsorted(sorted_groups, groups)
    return at, torch.searchsorted(sorted_groups, groups, right=True) - at


def _bucket_widths(counts: list[int], align: int, max_buckets: int) -> list[int]:
    """At most ``max_buckets`` widths (multiples of ``align``, increasing) for chunks of these key counts,
    each chunk going to the narrowest width that holds it, chosen to compute the fewest scores: the
    chunks' own widths rounded up to ``align``, merged (exactly, by dynamic programming over them) into
    ``max_buckets`` groups."""
    sizes: dict[int, int] = {}
    for c in counts:
        w = -(-max(c, 1) // align) * align
        sizes[w] = sizes.get(w, 0) + 1
    ws = sorted(sizes)
    n = [sizes[w] for w in ws]
    m = len(ws)
    if m <= max_buckets:
        return ws
    # cost[j][i]: fewest scores for the first i widths in j groups, the last group ending at width i - 1
    inf = float("inf")
    cost = [[inf] * (m + 1) for _ in range(max_buckets + 1)]
    back = [[0] * (m + 1) for _ in range(max_buckets + 1)]
    cost[0][0] = 0
    prefix = [0]
    for x in n:
        prefix.append(prefix[-1] + x)
    for j in range(1, max_buckets + 1):
        for i in range(1, m + 1):
            for s in range(j - 1, i):  # the group holds widths s .. i - 1, all padded to ws[i - 1]
                c = cost[j - 1][s] + (prefix[i] - prefix[s]) * ws[i - 1]
                if c < cost[j][i]:
                    cost[j][i], back[j][i] = c, s
    j = min(range(1, max_buckets + 1), key=lambda j: cost[j][m])
    out, i = [], m
    while i > 0:
        out.append(ws[i - 1])
        i, j = back[j][i], j - 1
    return sorted(out)


def gathered_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: Gathered,
                       scaling: float) -> torch.Tensor:
    """Attention of ``query`` (B, H, Tq, d) over ``key``/``value`` (B, Hkv, Tk, d) under ``layout``: per
    bucket one sdpa call over its chunks. Returns (B, Tq, H, d), the layout the model's output projection
    reads; padding queries get zeros. Autograd runs through the gathers and sdpa."""
    B, H, Tq, d = query.shape
    Hkv, Tk = key.shape[1], key.shape[2]
    if (B, Tq, Tk) != layout.shape:
        raise SDLMError(f"gathered attention got {B} rows of {Tq} queries over {Tk} keys for a layout of "
                        f"{layout.shape[0]} rows of {layout.shape[1]} over {layout.shape[2]}")
    if H % Hkv:
        raise SDLMError(f"gathered attention got {H} query heads for {Hkv} key/value heads: not a multiple")
    dev = query.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else query.dtype
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    g, C = H // Hkv, layout.chunk
    qf = query.transpose(1, 2).reshape(B * Tq, H, d)  # (B·Tq, H, d)
    kf = key.transpose(1, 2).reshape(B * Tk, Hkv, d)  # (B·Tk, Hkv, d)
    vf = value.transpose(1, 2).reshape(B * Tk, Hkv, d)
    outs = []
    # index_select, not indexing: its backward adds the gradients up with index_add (indexing's backward,
    # index_put with accumulate, sorts the indices on CUDA), and the indices repeat (spare query slots, and
    # keys that several chunks see)
    for b in layout.buckets:
        n, W = b.n, b.width
        q = qf.index_select(0, b.q_idx).view(n, C, Hkv, g, d).permute(0, 2, 3, 1, 4).reshape(n, Hkv, g * C, d)
        k = kf.index_select(0, b.k_idx).view(n, W, Hkv, d).transpose(1, 2)  # (n, Hkv, W, d)
        v = vf.index_select(0, b.k_idx).view(n, W, Hkv, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=b.mask(dtype, g), scale=scaling)
        outs.append(o.view(n, Hkv, g, C, d).permute(0, 3, 1, 2, 4).reshape(n * C, H, d))  # (n·C, H, d)
    outs.append(query.new_zeros(1, H, d))  # the row padding queries read
    return torch.cat(outs).index_select(0, layout.out_idx).view(B, Tq, H, d)
