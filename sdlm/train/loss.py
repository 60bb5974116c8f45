"""The SDLM training loss (SPEC §2) with per-slot metrics.

Two implementations of the same number:

- :func:`dense_loss`: one forward over the whole training layout with the dense
  mask from :mod:`sdlm.masks` (the reference; also the path for ``lora`` and
  ``full`` retrofits, where the clean tokens change too).
- :func:`two_pass_loss`: for the block-gated adapter. The clean tokens do not
  depend on the adapter (the gate is 0 there), so they run once without
  gradients and only supply KV; the blocks run with gradients and attend to
  that KV. The backward pass touches block tokens only.

The LM head runs only where there are targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attention import (BLOCK_ATTENTION, GATHER_ATTENTION, block_layout, causal_segments, fill_cache,
                         last_layer_idx)
from ..cpu import _pack, _packed_linear, can_prepack
from ..errors import SDLMError
from ..gathered import CHUNK, gathered
from ..layout import IGNORE, TrainingLayout
from ..masks import SHARED, TokenInfo, allowed, block_mask
from ..model import FLEX_ATTENTION, SDLM
from .fused import transpose_agrees


@dataclass
class Packed:
    """A batch of training layouts packed into rows. Fields (B, T).

    A row holds one or more samples: their clean tokens one after another,
    padded to the longest clean part of the batch, then their blocks one after
    another, padded to the longest block part. The clean part is therefore one
    prefix for the whole batch (the two-pass step runs it alone). Samples in a
    row are kept apart by ``seq`` (0, 1, ... within the row); padding has
    ``seq = -1``: it sees only itself, and nothing sees it. A prefix shared by the samples of a row
    (``pack(share_prefix=True)``) comes first in its clean part, with ``seq`` :data:`sdlm.masks.SHARED`.
    """

    input_ids: torch.Tensor
    info: TokenInfo
    block_labels: torch.Tensor
    slot: torch.Tensor
    ar_labels: torch.Tensor
    n_clean: int
    teacher_col: torch.Tensor | None = None
    """For block tokens: the clean column (same row) whose next-token prediction is the
    base model's distribution for this slot's target; -1 elsewhere."""

    @property
    def n_block_targets(self) -> int:
        return int((self.block_labels != IGNORE).sum())

    @property
    def n_real(self) -> int:
        """Tokens that are not padding (a shared prefix counts once)."""
        return int((self.info.seq != -1).sum())

    def to(self, device: torch.device | str) -> "Packed":
        """The same batch on ``device``: the masks are then built there (a (T x T) mask per row
        is the largest tensor of a step; building it on the host and copying it is slow)."""
        mv = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Packed(
            mv(self.input_ids), self.info.to(device), mv(self.block_labels),
            mv(self.slot), mv(self.ar_labels), self.n_clean, mv(self.teacher_col),
        )

    def columns(self, idx: torch.Tensor) -> "Packed":
        i = self.info
        return Packed(
            self.input_ids[:, idx],
            TokenInfo(i.pos[:, idx], i.block[:, idx], i.start[:, idx], i.seq[:, idx]),
            self.block_labels[:, idx],
            self.slot[:, idx],
            self.ar_labels[:, idx],
            int((idx < self.n_clean).sum()),
            None if self.teacher_col is None else self.teacher_col[:, idx],
        )


def assign_rows(layouts: list[TrainingLayout], row_tokens: int | None) -> list[list[int]]:
    """Group samples into rows of at most ``row_tokens`` tokens (clean + blocks).

    First-fit decreasing by length: few rows and little padding. ``None`` puts
    every sample in a row of its own. A sample longer than ``row_tokens`` gets
    a row to itself.
    """
    if not row_tokens:
        return [[i] for i in range(len(layouts))]
    order = sorted(range(len(layouts)), key=lambda i: -layouts[i].input_ids.shape[0])
    rows: list[list[int]] = []
    used: list[int] = []
    for i in order:
        n = layouts[i].input_ids.shape[0]
        for r, u in enumerate(used):
            if u + n <= row_tokens:
                rows[r].append(i)
                used[r] += n
                break
        else:
            rows.append([i])
            used.append(n)
    return [sorted(r) for r in rows]


def shared_prefix(layouts: list[TrainingLayout]) -> int:
    """How many leading clean tokens ``layouts`` can share in a row: the tokens they all begin with (such
    as a chat template's system prompt), short of the first that carries an AR label (the label is the
    next token, which is each sample's own) and leaving each sample at least one clean token of its own.
    0 for fewer than two layouts."""
    if len(layouts) < 2:
        return 0
    first = layouts[0].input_ids
    n = min(lay.n_clean for lay in layouts) - 1
    for lay in layouts:
        labelled = torch.nonzero(lay.ar_labels[: lay.n_clean] != IGNORE).flatten()
        n = min(n, int(labelled[0]) if len(labelled) else n)
        differ = torch.nonzero(lay.input_ids[:n] != first[:n]).flatten()
        n = min(n, int(differ[0]) if len(differ) else n)
    return max(n, 0)


def pack(layouts: list[TrainingLayout], pad_id: int = 0, row_tokens: int | None = None,
         share_prefix: bool = False) -> Packed:
    """Pack layouts into rows (see :func:`assign_rows`): (B, L_max + K_max).

    ``share_prefix``: a row of several samples holds the clean tokens they all begin with once
    (:func:`shared_prefix`), first in its clean part with ``seq`` :data:`sdlm.masks.SHARED`, which every
    sample of the row sees; each sample's clean tokens then start after them. The same attention for
    every real token, computed over fewer clean tokens."""
    rows = assign_rows(layouts, row_tokens)
    shared = [shared_prefix([layouts[i] for i in r]) if share_prefix else 0 for r in rows]
    clean_len = [P + sum(layouts[i].n_clean - P for i in r) for r, P in zip(rows, shared)]
    block_len = [sum(layouts[i].input_ids.shape[0] - layouts[i].n_clean for i in r) for r in rows]
    L, K = max(clean_len), max(block_len)
    B, T = len(rows), L + K
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    block = torch.full((B, T), -1, dtype=torch.long)
    start = torch.full((B, T), -1, dtype=torch.long)
    seq = torch.full((B, T), -1, dtype=torch.long)
    block_labels = torch.full((B, T), IGNORE, dtype=torch.long)
    slot = torch.full((B, T), -1, dtype=torch.long)
    ar_labels = torch.full((B, T), IGNORE, dtype=torch.long)
    teacher_col = torch.full((B, T), -1, dtype=torch.long)
    for b, (row, P) in enumerate(zip(rows, shared)):
        if P:  # the shared prefix, once (no labels: shared_prefix stops before the first)
            ids[b, :P] = layouts[row[0]].input_ids[:P]
            pos[b, :P] = torch.arange(P)
            seq[b, :P] = SHARED
        c, k = P, L  # write heads of the clean and block parts
        for s_idx, i in enumerate(row):
            lay = layouts[i]
            n, m = lay.n_clean - P, lay.input_ids.shape[0] - lay.n_clean
            for dst, src in ((slice(c, c + n), slice(P, P + n)), (slice(k, k + m), slice(P + n, P + n + m))):
                ids[b, dst] = lay.input_ids[src]
                pos[b, dst] = lay.info.pos[src]
                block[b, dst] = lay.info.block[src]
                start[b, dst] = lay.info.start[src]
                seq[b, dst] = s_idx
                block_labels[b, dst] = lay.block_labels[src]
                slot[b, dst] = lay.slot[src]
                ar_labels[b, dst] = lay.ar_labels[src]
            # slot j of a block at p predicts x_{p+j+1}, as the clean token at position p+j does
            at = lay.info.pos[P + n : P + n + m]
            teacher_col[b, k : k + m] = torch.where(at < P, at, c + at - P)
            c, k = c + n, k + m
    # padding: a block id of its own per pad column keeps pads out of every real block
    pad = seq == -1
    block = torch.where(pad & (torch.arange(T) >= L), -2 - torch.arange(T).expand(B, T), block)
    block = torch.where(pad & (torch.arange(T) < L), torch.full_like(block, -1), block)
    return Packed(ids, TokenInfo(pos, block, start, seq), block_labels, slot, ar_labels, L, teacher_col)


@dataclass
class LossOutput:
    loss: torch.Tensor
    """The optimised scalar: mean block CE (+ ar_loss_weight x mean AR CE)."""
    block_loss: torch.Tensor
    ar_loss: torch.Tensor | None
    slot_loss_sum: torch.Tensor  # (D,) summed CE per slot
    slot_correct: torch.Tensor  # (D,) top-1 hits per slot
    slot_count: torch.Tensor  # (D,) targets per slot
    n_block_targets: int


def _metrics(logits: torch.Tensor, labels: torch.Tensor, slots: torch.Tensor, block_size: int):
    """Per-target block CE (N,), in float32, and per-slot metrics. logits (N, V), labels (N,), slots (N,)."""
    labels = labels.to(logits.device)
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    return (ce, *_slot_metrics(ce, (logits.argmax(-1) == labels).float(), slots, block_size))


class _LinearCE(torch.autograd.Function):
    """Per-target CE (N,) in float32 and top-1 hits (N,) of ``hidden @ weight.T (+ bias)`` against
    ``labels``, ``chunk`` rows at a time, with the gradient taken in the same pass.

    For each chunk it computes the logits, their log-sum-exp, and, when ``hidden`` needs a gradient,
    ``(softmax - onehot) @ weight``: the gradient of each row's CE with respect to its hidden state. The
    backward pass only scales those rows. So no logits are kept for the backward pass (at most
    ``chunk`` rows of them exist at once), and the log-softmax backward, the NLL backward and its
    zero-filled (N, V) gradient are never run. The numbers are those of ``F.cross_entropy`` on the
    same logits (tested); the weight and bias get no gradient (the LM head of a retrofit that keeps
    the base frozen)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk, packed_t=None, vocab=None):
        N, V = hidden.shape[0], vocab or weight.shape[0]  # rows of ``weight`` past ``vocab``: zero padding
        ce = torch.empty(N, dtype=torch.float32, device=hidden.device)
        hits = torch.empty(N, dtype=torch.float32, device=hidden.device)
        grad = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if ctx.needs_input_grad[0] else None
        low, full = _workspace(weight, chunk if N > chunk // 2 else N)
        rows = _softmax_rows(hidden.device)
        for i in range(0, N, chunk):
            y = labels[i : i + chunk]
            n = len(y)
            h = hidden[i : i + chunk]
            z = torch.mm(h, weight.t(), out=low[:n]) if bias is None else torch.addmm(bias, h, weight.t(), out=low[:n])
            for j in range(0, n, rows):  # a few rows at a time: they stay in the cache through every pass
                yj = y[j : j + rows]
                m, at = len(yj), i + j
                zj = z[j : j + m, :V]  # the padding's columns stay zero, so the gradient product ignores them
                f = zj if zj.dtype == torch.float32 else full[:m, :V].copy_(zj)
                top, arg = f.max(-1)  # the first maximum, as argmax
                hits[at : at + m] = (arg == yj).float()
                picked = f.gather(1, yj[:, None])[:, 0]
                f.sub_(top[:, None]).exp_()  # in place: exp(z - max)
                total = f.sum(-1)
                ce[at : at + m] = top + total.log() - picked  # log-sum-exp - z[y]
                if grad is not None:
                    f.div_(total[:, None])  # softmax
                    f[torch.arange(m, device=f.device), yj] -= 1.0
                    if f is not zj:
                        zj.copy_(f)
            if grad is not None:  # (softmax - onehot) @ weight, on the packed transpose where there is one
                grad[i : i + chunk] = z @ weight if packed_t is None else _packed_linear(z, packed_t, None)
        ctx.mark_non_differentiable(hits)
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return ce, hits

    @staticmethod
    def backward(ctx, g_ce, g_hits):
        (grad,) = ctx.saved_tensors
        return (g_ce[:, None] * grad).to(ctx.hidden_dtype), None, None, None, None, None, None


def _workspace(weight: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The buffers of :class:`_LinearCE`, kept between calls: (rows, V) for the logits in ``weight``'s dtype
    and, for a low-precision weight, (:func:`_softmax_rows`, V) for a few rows of them in float32. Fresh
    tensors this large come from the operating system zeroed page by page at every step, which cost more
    than the arithmetic on them (measured on a CPU); reused ones do not. Grown when a call needs more rows,
    dropped when the weight's device or dtype changes."""
    V, few = weight.shape[0], _softmax_rows(weight.device)
    key = (weight.device, weight.dtype, V, few)
    kept = _WORKSPACE.get(key)
    if kept is None or kept[0].shape[0] < rows:
        _WORKSPACE.clear()  # one set at a time: the last shape's
        low = torch.empty(rows, V, dtype=weight.dtype, device=weight.device)
        full = (None if weight.dtype == torch.float32
                else torch.empty(min(rows, few), V, device=weight.device))
        kept = _WORKSPACE[key] = (low, full)
    return kept


def _softmax_rows(device: torch.device) -> int:
    """Rows of logits :class:`_LinearCE` takes through its softmax passes at a time. On a CPU, 32 rows of a
    49k vocabulary in float32 (6 MB) stay in the cache through the six passes, where a whole chunk went
    to memory and back at each: the LM head with the loss took 348 ms instead of 419 for 1024 targets in
    bf16 (its two products alone take 299), with the same numbers. A GPU runs a whole chunk per kernel."""
    return 32 if device.type == "cpu" else 1 << 30


_WORKSPACE: dict = {}


def fusable_head(sdlm: SDLM) -> torch.nn.Linear | None:
    """The model's LM head where :func:`linear_ce` can stand in for it and the loss: a plain linear
    layer whose output is the logits (no soft-capping or scale) and whose weights do not train."""
    try:
        head = sdlm.lm_head()
    except SDLMError:
        return None
    if not isinstance(head, torch.nn.Linear) or any(p.requires_grad for p in head.parameters()):
        return None
    return head


def linear_ce(hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor, chunk: int = 1024):
    """Per-target CE (N,) and top-1 hits (N,) of the logits ``head(hidden)`` (N, V) against ``labels`` (N,),
    computed ``chunk`` rows at a time (:class:`_LinearCE`). Under autocast the logits are computed in
    its dtype, as ``head(hidden)`` would be; a low-precision copy of the head's weights is made once
    and kept while they do not change."""
    dev = hidden.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    weight, bias = _cast_weight(head, dtype)
    packed_t = _packed_transpose(head, weight) if hidden.requires_grad else None
    with torch.autocast(dev, enabled=False):
        return _LinearCE.apply(hidden.to(dtype), weight, bias, labels.to(hidden.device), chunk, packed_t,
                               head.weight.shape[0])


def _row_multiple(device: torch.device) -> int:
    """What :func:`linear_ce` pads the LM head's rows to a multiple of: 64 on a GPU, 1 (no padding) elsewhere.

    A vocabulary with the mask token added is often odd (SmolLM2's 49152 + 1): logits rows of an odd
    length are misaligned for the GPU's tensor-core kernels, and the two products of the LM head fell
    back to slow ones there: on an H100, 0.65 and 0.49 ms per 1024 targets against 0.10 and 0.09 ms
    padded (``bench/results/lm-head-alignment-h100.txt``)."""
    return 64 if device.type == "cuda" else 1


def _packed_transpose(head: torch.nn.Linear, weight: torch.Tensor) -> torch.Tensor | None:
    """A oneDNN-packed copy of ``weight``'s transpose (H, V) for the gradient product ``(softmax - onehot) @
    weight`` of :class:`_LinearCE`, made once and kept on ``head`` while ``weight`` is unchanged; None
    where it does not apply (not a bf16 weight on a CPU that packs bf16, or a copy that fails a check).
    On a 2-core AVX-512 CPU that product took 135 ms instead of 152 for 1024 targets of a 49k vocabulary
    (medians of 12 interleaved calls); the logits' product is not packed: it was slower there (166
    against 155 ms), as it writes a fresh (N, V) tensor instead of the kept buffer."""
    if weight.dtype != torch.bfloat16 or not can_prepack(weight.dtype, weight.device):
        return None
    key = (weight.data_ptr(), weight._version, tuple(weight.shape))
    kept = getattr(head, "_sdlm_packed_t", None)
    if kept is None or kept[0] != key:
        try:
            packed = _pack(weight.t().contiguous())
        except RuntimeError:  # an unusual shape or build
            packed = None
        kept = (key, packed if packed is not None and transpose_agrees(weight, packed) else None)
        head._sdlm_packed_t = kept
    return kept[1]


def _cast_weight(head: torch.nn.Linear, dtype: torch.dtype):
    """``head``'s weight and bias in ``dtype``, with zero rows appended up to a multiple of
    :func:`_row_multiple` rows (their logits are zero, and :class:`_LinearCE` leaves them out of the
    softmax); made once and kept on the module while unchanged, and ``head``'s own where nothing changes."""
    w = head.weight
    V, m = w.shape[0], _row_multiple(w.device)
    if w.dtype == dtype and V % m == 0:
        return w, head.bias
    key = (dtype, m, w.data_ptr(), w._version)
    kept = getattr(head, "_sdlm_cast", None)
    if kept is None or kept[0] != key:
        pad = -V % m
        weight = torch.cat([w.detach().to(dtype), w.new_zeros(pad, w.shape[1], dtype=dtype)])
        bias = None if head.bias is None else torch.cat([head.bias.detach().to(dtype), w.new_zeros(pad, dtype=dtype)])
        kept = (key, weight, bias)
        head._sdlm_cast = kept
    return kept[1], kept[2]


def _slot_metrics(ce: torch.Tensor, correct: torch.Tensor, slots: torch.Tensor, block_size: int):
    """Summed CE, top-1 hits and target counts per slot, on the host: three (D,) tensors."""
    slots = slots.to(ce.device)
    per_slot = torch.zeros(3, block_size, device=ce.device)
    per_slot[0].index_add_(0, slots, ce.detach().float())
    per_slot[1].index_add_(0, slots, correct)
    per_slot[2].index_add_(0, slots, torch.ones_like(correct))
    slot_loss, slot_correct, slot_count = per_slot.cpu()  # one transfer
    return slot_loss, slot_correct, slot_count


def _slot_mean(
    ce: torch.Tensor, slots: torch.Tensor, slot_weights: list[float] | None, norm: float | None = None
) -> torch.Tensor:
    """Mean of per-target losses ``ce`` (N,); with ``slot_weights``, target i counts
    ``slot_weights[slot_i]`` times (a weighted mean: the weights' scale does not matter).
    With ``norm``, the (weighted) sum is divided by ``norm`` instead of by its own weight."""
    if slot_weights is None:
        return ce.mean() if norm is None else ce.sum() / norm
    w = torch.as_tensor(slot_weights, dtype=ce.dtype, device=ce.device)[slots.to(ce.device)]
    return (w * ce).sum() / (w.sum().clamp_min(1e-12) if norm is None else norm)


def loss_norm(layouts: list[TrainingLayout], slot_weights: list[float] | None = None) -> float:
    """The denominator of the block loss over ``layouts``: their number of targets, or their
    summed slot weights. Parts of a batch given this ``norm`` (:func:`two_pass_loss`) add up to
    the whole batch's mean loss."""
    slots = [lay.slot[lay.block_labels != IGNORE] for lay in layouts]
    if slot_weights is None:
        return float(sum(len(sl) for sl in slots))
    w = torch.tensor(slot_weights)
    return float(sum(w[sl].sum() for sl in slots))


def dense_loss(
    sdlm: SDLM, batch: Packed, block_size: int, ar_loss_weight: float = 0.0, slot_weights: list[float] | None = None
) -> LossOutput:
    """Reference: one forward over the whole training layout with the dense (T x T) mask.

    ``slot_weights`` (one per slot) turns the block loss into a weighted mean over targets."""
    cfg = sdlm.config
    batch = batch.to(sdlm.device)
    has_block = batch.block_labels != IGNORE  # (B, T)
    has_ar = (batch.ar_labels != IGNORE) & bool(ar_loss_weight > 0)
    keep = torch.nonzero((has_block | has_ar).any(0)).flatten()  # LM head only where some row has a target
    mask = _mask(sdlm, batch.info, batch.info, cfg.causal_within_block)  # (B, 1, T, T)
    logits = _forward_keep(sdlm, batch.input_ids, batch.info, mask, None, keep)  # (B, N, V)
    kb, ka = has_block[:, keep], has_ar[:, keep]
    slots = batch.slot[:, keep][kb]
    ce, sl, sc, sn = _metrics(logits[kb], batch.block_labels[:, keep][kb], slots, block_size)
    block_loss, ar_loss = ce.mean(), None
    loss = _slot_mean(ce, slots, slot_weights)
    if ka.any():
        ar_loss = F.cross_entropy(logits[ka].float(), batch.ar_labels[:, keep][ka].to(logits.device))
        loss = loss + ar_loss_weight * ar_loss
    return LossOutput(loss, block_loss.detach(), None if ar_loss is None else ar_loss.detach(), sl, sc, sn, int(kb.sum()))


def two_pass_loss(
    sdlm: SDLM,
    batch: Packed,
    block_size: int,
    distill: float = 0.0,
    slot_weights: list[float] | None = None,
    norm: float | None = None,
    chunk: int | None = None,
    gather_chunk: int = CHUNK,
    clean_attention: str = "auto",
) -> LossOutput:
    """Fast path for the gated adapter: clean tokens without gradients, then blocks with them.
    For a model set up with :func:`sdlm.attention.use_block_attention`, a batch of one-sample rows, or
    one row of several samples without padding, runs block attention in the block pass (and, for the
    one row, a causal clean pass per sample). For one set up with
    :func:`sdlm.attention.use_gathered_attention`, both passes run gathered attention
    (:mod:`sdlm.gathered`), ``gather_chunk`` queries per chunk. ``clean_attention``: how block attention's
    one-row clean pass runs (:attr:`sdlm.attention.CausalSegments.kernel`).

    ``distill`` > 0 mixes in soft targets: the base model's own next-token
    distribution at the matching clean position (the clean pass computes it
    anyway), ``(1 - distill) * CE(hard) + distill * CE(soft)``. ``slot_weights``
    as in :func:`dense_loss`. ``norm`` (see :func:`loss_norm`): divide the summed
    target losses by it instead of averaging, so the losses of a batch run in parts
    add up to the batch's loss. With hard labels the LM head and the loss run together
    (:func:`linear_ce`), ``chunk`` targets at a time (default 1024): the same loss and gradients with
    at most ``chunk`` rows of logits in memory; a ``chunk`` with ``distill`` is an error (soft targets
    need the logits).

    A batch of one unpadded sample (one row) runs its clean pass without a mask
    (plain causal attention, which attention kernels run at half the cost of a
    masked one) and takes its logits at exactly the target columns.
    """
    from transformers import DynamicCache

    cfg = sdlm.config
    batch = batch.to(sdlm.device)
    L, T = batch.n_clean, batch.input_ids.shape[1]
    clean, blocks = batch.columns(torch.arange(L, device=sdlm.device)), batch.columns(torch.arange(L, T, device=sdlm.device))
    has_block = blocks.block_labels != IGNORE
    keep = torch.nonzero(has_block.any(0)).flatten()
    kb = has_block[:, keep]

    impl = getattr(sdlm.model.config, "_attn_implementation", None)
    blocks_attn, gather_attn = impl == BLOCK_ATTENTION, impl == GATHER_ATTENTION
    plain = _plain_causal(clean.info)
    if gather_attn or blocks_attn:
        _no_window(sdlm, batch.info, "gather" if gather_attn else "blocks")
    if gather_attn:  # both layouts before the passes run: their host syncs then wait on no pass
        clean_gathered = None if plain else gathered(clean.info, clean.info, chunk=gather_chunk)
        block_gathered = gathered(blocks.info, TokenInfo.cat([clean.info, blocks.info]), cfg.causal_within_block,
                                  gather_chunk)
    cache = DynamicCache()
    with torch.no_grad():  # the clean pass: base model only (gate 0), it fills the cache
        if plain:
            mask = None
        elif gather_attn:  # each chunk of clean tokens over the clean keys it sees
            mask = clean_gathered
        else:  # several samples in one row: causal within each (block attention's models), else the dense rule
            mask = (causal_segments(clean.info, clean_attention) if blocks_attn else None) \
                or _mask(sdlm, clean.info, clean.info)
        if distill > 0:
            tcol = blocks.teacher_col[:, keep][kb]  # (N,) clean column of each target's teacher
            rows = torch.nonzero(kb)[:, 0]
            need = torch.unique(tcol)
            t_logits = _forward_keep(sdlm, clean.input_ids, clean.info, mask, cache, need)  # (B, U, V)
            where = torch.searchsorted(need, tcol)
            teacher = torch.softmax(t_logits[rows, where].float(), -1)  # (N, V)
            del t_logits
        else:  # KV only: no LM head, and with the block pattern no work past the last layer's keys and values
            fill_cache(lambda: sdlm.forward(clean.input_ids, clean.info.pos, mask, clean.info.is_block, cache,
                                            hidden=True), mask, last_layer_idx(sdlm.model))
    mask = None
    if gather_attn:
        mask = block_gathered
    elif blocks_attn:
        mask = block_layout(blocks.info, clean.info, block_size, cfg.causal_within_block, sdlm.dtype)
        if mask is not None:
            mask.clean_needs_grad = False  # the clean KV comes from the pass above, without gradients
    if mask is None:  # the dense (B, 1, K, L+K) mask (or flex's block mask)
        mask = _mask(sdlm, blocks.info, TokenInfo.cat([clean.info, blocks.info]), cfg.causal_within_block)
    # Gate 1 on the whole block part, padding included: padding sees only padding, no real token sees
    # it and no loss reads it, so its value is free, and an all-ones gate skips the gate multiply.
    slots, labels = blocks.slot[:, keep][kb], blocks.block_labels[:, keep][kb]
    if chunk and distill > 0:
        raise SDLMError("loss_chunk computes hard-label losses only: set distill: 0 or drop loss_chunk")
    head = fusable_head(sdlm) if distill == 0 else None
    if chunk and head is None:
        raise SDLMError("loss_chunk needs an LM head that is a plain linear layer with frozen weights and no "
                        "logit soft-capping or scale: drop loss_chunk")
    if head is not None:  # hard labels: the LM head and the loss in one pass (linear_ce)
        h = sdlm.forward(blocks.input_ids, blocks.info.pos, mask, True, cache, hidden=True)[:, keep]  # (B, N, H)
        ce, correct = linear_ce(h.flatten(0, 1) if bool(kb.all()) else h[kb], head, labels, chunk or 1024)
        sl, sc, sn = _slot_metrics(ce, correct, slots, block_size)
    else:
        logits = _forward_keep(sdlm, blocks.input_ids, blocks.info, mask, cache, keep, gate=True)  # (B, N, V)
        # every kept column a target (one row): a view, not a gather (whose backward fills a zero (B, N, V))
        logits = logits.flatten(0, 1) if bool(kb.all()) else logits[kb]
        ce, sl, sc, sn = _metrics(logits, labels, slots, block_size)
    block_loss = ce.mean()
    loss = _slot_mean(ce, slots, slot_weights, norm)
    if distill > 0:
        soft = _slot_mean(F.cross_entropy(logits.float(), teacher, reduction="none"), slots, slot_weights, norm)
        loss = (1 - distill) * loss + distill * soft
    return LossOutput(loss, block_loss.detach(), None, sl, sc, sn, int(kb.sum()))


def _no_window(sdlm: SDLM, info: TokenInfo, attention: str) -> None:
    """Refuse a batch whose samples reach past a layer's sliding window or chunk: ``attention`` applies the
    rule alone (the dense ``sdpa`` masks apply the windows too)."""
    if sdlm.windows.binding(info.pos, info.pos):
        raise SDLMError(f"this model's layers see at most {sdlm.windows.smallest} positions back, and attention: "
                        f"{attention} does not apply that window; samples reach position {int(info.pos.max())}: "
                        f"use attention: sdpa, or keep max_length + block_size within {sdlm.windows.smallest}")


def _mask(sdlm: SDLM, q: TokenInfo, k: TokenInfo, causal_within_block: bool = False):
    """The attention mask of queries ``q`` over keys ``k``: a flex-attention block mask when the model
    runs flex attention (:func:`sdlm.model.use_flex_attention`), else the dense additive (B, 1, Tq, Tk) one,
    in the autocast dtype under autocast."""
    if getattr(sdlm.model.config, "_attn_implementation", None) == FLEX_ATTENTION:
        _no_window(sdlm, k, "flex")
        return block_mask(q, k, causal_within_block)
    # under autocast sdpa runs in the autocast dtype: a mask made in it is not cast again in every layer
    kind = sdlm.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else sdlm.dtype
    return sdlm.masks(allowed(q, k, causal_within_block), q.pos, k.pos, dtype)


def _plain_causal(info: TokenInfo) -> bool:
    """One row of one sample's clean tokens at positions 0, 1, ..., no padding: plain causal attention."""
    if info.pos.shape[0] != 1 or not bool((info.block < 0).all()):
        return False
    if info.seq is not None and not bool((info.seq == 0).all()):
        return False
    return bool(torch.equal(info.pos[0], torch.arange(info.pos.shape[1], device=info.pos.device)))


def _forward_keep(sdlm: SDLM, ids, info: TokenInfo, mask, cache, keep: torch.Tensor, gate=None) -> torch.Tensor:
    """Forward a (B, T) batch; return logits (B, N, V) at the ``keep`` columns only.
    ``gate``: the adapter's gate (default: on at block tokens; ``True``: on everywhere)."""
    gate = info.is_block if gate is None else gate
    if sdlm._takes_logits_to_keep:
        return sdlm.forward(ids, info.pos, mask, gate, cache, keep.to(sdlm.device))
    return sdlm.forward(ids, info.pos, mask, gate, cache)[:, keep]
