"""The decoder: prefill -> propose -> verify/accept -> commit, as a stream of steps.

One forward pass per step. Modes (SPEC §3):

- ``ar``: plain causal decoding, one token per step (the baseline).
- ``confidence``: one block per step; commit the longest prefix of block
  predictions whose confidence is above the threshold (lossy, fastest). With
  ``verify``, the block slots below the threshold become drafts that the next
  forward verifies, as in ``speculative``.
- ``speculative``: the block's predictions are drafts that the next forward
  verifies with the model's own causal logits; output == AR output (lossless).
  With a draft tree (``tree``, :mod:`sdlm.tree`) a step verifies several
  candidate continuations at once.

:class:`Decoder` keeps an exact KV cache of committed tokens only: every step
appends its new tokens' KV and crops what must not stay (block KV is computed
over masks; rejected drafts are wrong). With ``use_cache=False`` every step
recomputes everything from scratch: the slow reference the tests compare with.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .accept import confident_prefix, confident_run, cut_at_eos, greedy_accept, speculative_accept
from .errors import SDLMError
from .kvcache import new_cache
from .layout import StepLayout, ar_step, confidence_step, speculative_step
from .model import SDLM, decoder_of
from .sampling import Sampler, confidence

logger = logging.getLogger(__name__)

MODES = ("ar", "confidence", "speculative")
CONFIDENCES = ("prob", "entropy")
FIRST_TOKENS = ("block", "causal")


@dataclass
class GenerationConfig:
    """How to decode. Defaults: lossless speculative decoding, greedy."""

    mode: str = "speculative"
    """``ar``, ``confidence`` or ``speculative`` (lossless: the model's own AR output, faster)."""
    block_size: int | None = None
    """Block size D at decoding time; default: the size the model was trained with (4 if untrained)."""
    threshold: float = 0.9
    """Confidence threshold tau in [0, 1] for mode ``confidence``."""
    confidence: str = "prob"
    """``prob`` (probability of the chosen token) or ``entropy`` (1 - H/log V)."""
    first_token: str = "block"
    """Mode ``confidence``: who picks the always-committed first token of a step. ``block``: the
    block's slot 0 (SPEC §3.1, the paper). ``causal``: the model's own next-token prediction at the
    last committed token, read from the same forward; the block's slots 1.. are then committed only
    when its slot 0 agrees with it (with the block-gated adapter that first token is the base
    model's own, so the output stays much closer to it; at threshold 1 it equals ``ar``)."""
    verify: bool = False
    """Mode ``confidence``: verify what a step does not commit. Each step runs a speculative step
    (SPEC §3.2): it verifies the previous drafts with the model's own causal logits and commits the
    accepted ones and the model's own next token; then it also commits the longest prefix of the
    new block's slots 1.. whose confidence is above the threshold (when the block's slot 0 agrees
    with that token), and the slots after them are the next step's drafts instead of being thrown
    away. A committed token is then either the model's own or a confident block prediction; at
    threshold 1 the output is exactly ``speculative``'s. ``first_token`` does not apply (the first
    token of a step is always the model's own)."""
    draft_threshold: float | None = None
    """Steps with drafts (``speculative``, ``confidence`` with ``verify``): verify only the longest prefix
    of the new drafts whose joint probability, the product of their slots' top probabilities (greedy: the
    drafts' own), stays above this; with a draft ``tree``, only the nodes whose joint probability along
    their rank path is above it (:meth:`sdlm.tree.DraftTree.likely_nodes`). Unlikely drafts are rarely accepted, and
    dropping them makes the next forward smaller (each draft verified adds itself and a candidate
    block of D tokens). ``speculative``'s output is unchanged: greedy, only fewer drafts are offered;
    sampled, how many are offered does not depend on the tokens drawn, so speculative sampling keeps
    AR sampling's distribution (a tree's walk draws the model's own tokens whatever the nodes offered). 0
    offers every draft. None (the default): :data:`CPU_DRAFT_THRESHOLD` for ``speculative``'s chain on a
    CPU, where a forward's cost grows with its tokens, :data:`CPU_TREE_DRAFT_THRESHOLD` for its trees there,
    and 0 otherwise (:func:`draft_threshold_for`)."""
    block_threshold: float | None = None
    """``speculative`` (and ``confidence`` with ``verify``): a step carries the candidate block of an accept
    length only where the drafts make that length at least this likely, and none where no length is (then
    the next step verifies no drafts and carries one block again). A step with ``k`` drafts otherwise
    carries ``k + 1`` candidate blocks of D tokens, one for each number of drafts it may accept, and reads
    only one of them. The chance of accepting exactly ``a`` drafts is read from the drafts' top
    probabilities ``p_1 .. p_k`` as ``p_1 * .. * p_a * (1 - p_{a+1})`` (the last factor is left out for
    ``a = k``); with a draft ``tree``, the chance that the walk ends at a node is its joint probability less
    its offered children's (:meth:`sdlm.tree.DraftTree.likely_ends`). A step without drafts always carries
    its block. ``speculative``'s output is unchanged (the
    blocks only decide which drafts the next step offers, and that from probabilities, never from the
    tokens drawn). 0 carries every block. None (the default): :data:`CPU_BLOCK_THRESHOLD` for
    ``speculative`` on a CPU, where a block's tokens cost time, and 0 otherwise (:func:`block_threshold_for`)."""
    max_new_tokens: int = 256
    temperature: float = 0.0
    """0 = greedy; > 0 samples (speculative mode then uses speculative sampling)."""
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    """Stop strings: generation ends when the text contains one (it is cut from the text)."""
    use_cache: bool = True
    """False recomputes every step from scratch (the reference decoder)."""
    tree: str | None = None
    """Mode ``speculative``: verify a tree of draft candidates per step instead of one chain
    (:mod:`sdlm.tree`). ``auto``: the model's calibrated tree for this D; widths per depth such as
    ``3,2,1``; or a JSON file of rank paths. None / ``none``: the chain (SPEC §3.2). Still lossless,
    greedy or sampled (a sampled token is drawn from the model's own distribution at each node the
    walk reaches: with the same seed, the same tokens as ``ar``); more tokens per forward for a
    larger forward."""

    @property
    def drafting(self) -> bool:
        """Whether steps carry drafts (SPEC §3.2's layout): ``speculative``, and ``confidence`` with ``verify``."""
        return self.mode == "speculative" or (self.mode == "confidence" and self.verify)

    @property
    def wants_tree(self) -> bool:
        """Whether ``tree`` asks for a draft tree rather than the chain."""
        return self.tree not in (None, "", "none", "chain")

    def validate(self) -> None:
        if self.mode not in MODES:
            raise SDLMError(f"unknown mode {self.mode!r}: use one of {', '.join(MODES)}")
        if self.confidence not in CONFIDENCES:
            raise SDLMError(f"unknown confidence {self.confidence!r}: use 'prob' or 'entropy'")
        if self.first_token not in FIRST_TOKENS:
            raise SDLMError(f"unknown first token source {self.first_token!r}: use 'block' or 'causal'")
        if self.first_token == "causal" and self.mode != "confidence":
            raise SDLMError(f"first token 'causal' is for mode confidence (mode {self.mode} already commits the "
                            "model's own tokens): drop --first-token or use --mode confidence")
        if self.verify and self.mode != "confidence":
            raise SDLMError(f"verify is for mode confidence (mode {self.mode} "
                            f"{'already verifies every draft' if self.mode == 'speculative' else 'has no drafts'}): "
                            "drop --verify or use --mode confidence")
        if self.block_size is not None and self.block_size < 1:
            raise SDLMError(f"block size must be >= 1, got {self.block_size}: use --block-size 4 (or any D >= 1)")
        if self.draft_threshold is not None and not 0.0 <= self.draft_threshold < 1.0:
            raise SDLMError(f"draft threshold must be in [0, 1), got {self.draft_threshold}: try --draft-threshold 0.1 "
                            "(0 = verify every draft)")
        if self.draft_threshold and not self.drafting:
            raise SDLMError("a draft threshold is for the modes with drafts (speculative, confidence --verify): "
                            "drop --draft-threshold or change --mode")
        if self.block_threshold is not None and not 0.0 <= self.block_threshold <= 1.0:
            raise SDLMError(f"block threshold must be in [0, 1], got {self.block_threshold}: try --block-threshold 0.8 "
                            "(0 = a candidate block for every accept length)")
        if self.block_threshold and not self.drafting:
            raise SDLMError("a block threshold is for the modes with drafts (speculative, confidence --verify): "
                            "drop --block-threshold or change --mode")
        if not 0.0 <= self.threshold <= 1.0:
            raise SDLMError(f"threshold must be in [0, 1], got {self.threshold}: try --threshold 0.9")
        if self.max_new_tokens < 1:
            raise SDLMError(f"max new tokens must be >= 1, got {self.max_new_tokens}")
        if self.wants_tree and self.mode != "speculative":
            raise SDLMError(f"a draft tree is for mode speculative, not {self.mode}: drop --tree or use --mode speculative")
        if self.temperature < 0:
            raise SDLMError(f"temperature must be >= 0, got {self.temperature} (0 = greedy)")
        if self.top_k < 0:
            raise SDLMError(f"top-k must be >= 0, got {self.top_k} (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise SDLMError(f"top-p must be in (0, 1], got {self.top_p} (1 = off)")


@dataclass
class Step:
    """What one forward pass committed."""

    tokens: list[int]
    """Tokens committed by this step (at least one)."""
    proposed: int
    """Block predictions on offer: drafts verified (speculative), block slots (confidence), or with
    ``verify`` the drafts verified plus the new block's slots 1..; 0 for AR."""
    finish_reason: str | None = None
    """``eos``, ``stop`` or ``length`` on the last step, else None."""

    @property
    def count(self) -> int:
        return len(self.tokens)


@dataclass
class Generation:
    """The result of one generation, with its speed statistics."""

    prompt_tokens: int
    tokens: list[int]
    text: str
    forwards: int
    seconds: float
    finish_reason: str
    accept_histogram: dict[int, int] = field(default_factory=dict)

    @property
    def new_tokens(self) -> int:
        return len(self.tokens)

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / max(self.forwards, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "new_tokens": self.new_tokens,
            "prompt_tokens": self.prompt_tokens,
            "forwards": self.forwards,
            "tokens_per_forward": round(self.tokens_per_forward, 4),
            "seconds": round(self.seconds, 4),
            "tokens_per_second": round(self.tokens_per_second, 3),
            "finish_reason": self.finish_reason,
            "accept_histogram": {str(k): v for k, v in sorted(self.accept_histogram.items())},
            "tokens": self.tokens,
        }


CPU_DRAFT_THRESHOLD = 0.1
"""The draft threshold (:attr:`GenerationConfig.draft_threshold`) of ``speculative`` on a CPU. There a forward's
cost grows with its tokens (a 2-core AVX2 CPU, float32, the default model: 78 ms for 1 token, 119 ms
for 5, 150 ms for 20, 272 ms for 72), and offering only the drafts above 0.1 was measured faster than
offering every draft, at D = 4 and more so at D = 8 (``bench/draft_threshold_cost.py`` and
``bench/decode_speed.py --interleave``; figures in the README). Elsewhere (a GPU running a small
model) a forward's cost hardly grows with its tokens, and every draft is offered."""

CPU_TREE_DRAFT_THRESHOLD = 0.2
"""The draft threshold of ``speculative`` with a draft tree on a CPU: a step offers the tree's nodes whose
joint probability is above 0.2. A tree's runners-up are each less likely than the chain's drafts: priced on a
2-core AVX2 CPU with the default model's trees (``bench/draft_threshold_cost.py --tree auto``; figures in the
README), 0.1 offered about four nodes a step and was slower than 0.15 to 0.2, and at 0.2 the tree decoded
about as fast as the chain at :data:`CPU_DRAFT_THRESHOLD`, with a few more tokens per forward."""


def draft_threshold_for(config: GenerationConfig, device: torch.device | str) -> float:
    """The draft threshold a decoder uses: the config's, or by default :data:`CPU_DRAFT_THRESHOLD` for
    ``speculative``'s chain of drafts on a CPU, :data:`CPU_TREE_DRAFT_THRESHOLD` for its draft trees there,
    and 0 otherwise: other devices, modes without drafts, and ``confidence`` with ``verify``, whose output
    (not the model's own) would change with the drafts offered."""
    if config.draft_threshold is not None:
        return config.draft_threshold
    if config.mode != "speculative" or torch.device(device).type != "cpu":
        return 0.0
    return CPU_TREE_DRAFT_THRESHOLD if config.wants_tree else CPU_DRAFT_THRESHOLD


CPU_BLOCK_THRESHOLD = 0.8
"""The block threshold (:attr:`GenerationConfig.block_threshold`) of ``speculative``'s chain on a CPU: a
step carries the candidate block of an accept length only where that length has a chance of at least 0.8,
which leaves at most one block, and none where the drafts leave the outcome open. On a CPU the first block of
a step costs most of all (the adapter's products and a second pass of the LM head: on a 2-core Xeon, float32,
the default model, a step of 5 tokens costs about 1.6 steps of 1), and every further block a little more,
while the drafts a block brings are often rejected. There, decoding 8 prompts at D = 4 went from x0.87 to
x1.06 of ``ar``'s speed on chat and from x0.97 to x1.16 on GSM8K, and the calibrated 10-node tree from x0.76
to x0.90 and from x1.06 to x1.23 (``bench/draft_threshold_cost.py --block-thresholds`` and
``bench/decode_speed.py --interleave``; figures in the README)."""


def block_threshold_for(config: GenerationConfig, device: torch.device | str) -> float:
    """The block threshold a decoder uses: the config's, or by default :data:`CPU_BLOCK_THRESHOLD` for
    ``speculative`` on a CPU (its chain and its draft trees), and 0 (every candidate block) otherwise."""
    if config.block_threshold is not None:
        return config.block_threshold
    if config.mode != "speculative" or torch.device(device).type != "cpu":
        return 0.0
    return CPU_BLOCK_THRESHOLD


def likely_accept_lengths(top_probs: Sequence[float], threshold: float) -> list[int]:
    """Which numbers of accepted drafts get a candidate block: those whose chance is at least ``threshold``.

    ``top_probs`` are the ``k`` offered drafts' top probabilities. The chance of accepting exactly ``a`` of
    them is ``p_1 * .. * p_a * (1 - p_{a+1})`` (for ``a = k``: ``p_1 * .. * p_k``). Without drafts the one
    length, 0, is certain."""
    out, joint = [], 1.0
    k = len(top_probs)
    for a in range(k + 1):
        chance = joint * (1.0 - float(top_probs[a])) if a < k else joint
        if chance >= threshold:
            out.append(a)
        if a < k:
            joint *= float(top_probs[a])
    return out


def likely_drafts(top_probs: torch.Tensor, threshold: float) -> int:
    """How many leading drafts to offer: the longest prefix whose joint probability, the product of
    the slots' top probabilities ``top_probs``, stays strictly above ``threshold``.

    The top probability (the greedy draft's own), never the drawn token's: how many drafts are offered
    then does not depend on the draws, and speculative sampling stays exact."""
    return confident_run(torch.cumprod(top_probs.float(), 0), threshold)


class Decoder:
    """Decode prompts with one SDLM under one :class:`GenerationConfig`."""

    def __init__(self, sdlm: SDLM, config: GenerationConfig | None = None):
        config = config or GenerationConfig()
        config.validate()
        if config.mode == "confidence" and not sdlm.is_retrofitted:
            raise SDLMError(
                f"mode 'confidence' needs a retrofitted model, and {sdlm.name or 'this model'} has no SDLM "
                "settings: use --mode ar or --mode speculative, or retrofit and train it first (sdlm train)"
            )
        if config.mode == "speculative" and not sdlm.is_retrofitted:
            logger.info("no SDLM settings: adding an untrained mask token; output stays exact, ~1 token/forward")
            sdlm.retrofit(block_size=config.block_size or 4)
        self.sdlm = sdlm
        self.config = config
        self.block_size = config.block_size or (sdlm.config.block_size if sdlm.config else 1)
        mask_id = sdlm.config.mask_token_id if sdlm.config else None
        self.mask_token_id = mask_id
        self.sampler = Sampler(
            config.temperature, config.top_k, config.top_p, suppress=(mask_id,) if mask_id is not None else ()
        )
        self.eos_ids = sdlm.eos_token_ids()
        # steps with drafts read the logits of few of their rows (the causal ones, then one block): the LM
        # head runs on those only, where the model's logits are its LM head's output
        self._plain_head = config.drafting and _plain_head(sdlm)
        self.draft_threshold = draft_threshold_for(config, sdlm.device)
        self.block_threshold = block_threshold_for(config, sdlm.device)
        self.tree = None
        if config.mode == "speculative":
            from .tree import parse_tree

            self.tree = parse_tree(config.tree, sdlm.config.draft_trees if sdlm.config else None, self.block_size)

    # ------------------------------------------------------------ public

    def stream(self, prompt_ids: Sequence[int]) -> Iterator[Step]:
        """Yield one :class:`Step` per forward pass until EOS, a stop string or the length limit."""
        cfg = self.config
        ids = [int(t) for t in prompt_ids]
        n_prompt = len(ids)
        self._check_prompt(n_prompt)
        max_new = self._max_new(n_prompt)
        generator = torch.Generator()  # the decoder's own: never reseed torch's global generator
        if cfg.seed is not None:
            generator.manual_seed(cfg.seed)
        else:
            generator.seed()
        cache = self._new_cache() if cfg.use_cache else None
        # a model whose step_logits was replaced on the instance (a wrapper, a test double) is read through it
        lazy_head = self._plain_head and "step_logits" not in vars(self.sdlm)
        cached = 0  # committed tokens whose KV is in the cache
        drafts: list[int] = []  # speculative: proposals for the positions after the next bonus token
        draft_q: torch.Tensor | None = None  # their draft distributions (the thresholds read their top probabilities)
        text_before = ""

        while True:
            n = len(ids)
            remaining = max_new - (n - n_prompt)
            first = cached if cfg.use_cache else 0
            uncached = ids[first:]

            if cfg.drafting:
                drafts = self._trim_drafts(drafts, remaining)
                if draft_q is not None:
                    draft_q = draft_q[: len(drafts)]
            step = self._layout(uncached, first, drafts, draft_q)
            if cache is not None:
                self.sdlm.trim(cache, first)  # windowed layers: what no query at position >= first can see
            if lazy_head:
                logits = _LazyLogits(self.sdlm, self.sdlm.step_hidden(step, cache, cached))
            else:
                logits = self.sdlm.step_logits(step, cache, cached)
            out = self._accept(logits, uncached, first, drafts, draft_q, generator, step.blocks)
            new, proposed, keep, drafts, draft_q = out.tokens, out.proposed, out.keep, out.drafts, out.draft_q
            if cache is not None:
                if out.kept_drafts is not None:  # a tree accepted nodes other than its first ones: keep their KV
                    SDLM.keep_tail(cache, first + len(uncached), out.kept_drafts)
                else:
                    SDLM.crop(cache, first + len(step.input_ids) - keep)  # rejected drafts, block KV (over masks)
            if cfg.use_cache:
                cached = keep

            new, reason = cut_at_eos(new, self.eos_ids, remaining)
            if cfg.stop:
                new, text_before, stopped = self._cut_at_stop(ids[n_prompt:], new, text_before)
                reason = "stop" if stopped else reason
            ids.extend(new)
            yield Step(new, proposed, reason)
            if reason is not None:
                return

    def generate(self, prompt_ids: Sequence[int]) -> Generation:
        """Decode to the end and return tokens, text and statistics."""
        start = time.perf_counter()
        tokens: list[int] = []
        hist: Counter[int] = Counter()
        forwards = 0
        reason = "length"
        for step in self.stream(prompt_ids):
            tokens.extend(step.tokens)
            hist[step.count] += 1
            forwards += 1
            reason = step.finish_reason or reason
        seconds = time.perf_counter() - start
        return Generation(len(prompt_ids), tokens, self.decode_text(tokens), forwards, seconds, reason, dict(hist))

    def decode_text(self, tokens: Sequence[int]) -> str:
        text = self.sdlm.tokenizer.decode(list(tokens), skip_special_tokens=True)
        for s in self.config.stop:
            i = text.find(s)
            if i >= 0:
                text = text[:i]
        return text

    # ------------------------------------------------------------ the three steps

    def _layout(self, uncached, first, drafts, draft_q=None) -> StepLayout:
        """The new tokens of one step (SPEC §3): what the mode feeds after the cached ones."""
        if self.config.mode == "ar":
            return ar_step(uncached, first)
        if self.config.mode == "confidence" and not self.config.verify:
            return confidence_step(uncached, first, self.block_size, self.mask_token_id,
                                   causal_first=self.config.first_token == "causal")
        parents = self._tree_parents(drafts) if self.tree is not None else None
        return speculative_step(uncached, first, drafts, self.block_size, self.mask_token_id, parents,
                                self._carried_blocks(drafts, draft_q))

    def _accept(self, logits, uncached, first, drafts, draft_q, generator, blocks=None) -> "_Accepted":
        """What one step commits, from its ``n_logits`` logits (see the step layouts); ``blocks``: the candidate
        blocks the step carries (:attr:`StepLayout.blocks`)."""
        n = first + len(uncached)
        if self.config.mode == "ar":  # one causal token; every committed token's KV stays
            tok, _ = self.sampler.choose(logits, generator)
            return _Accepted([int(tok[0])], 0, n)
        D = self.block_size
        if self.config.mode == "confidence" and not self.config.verify:
            # §3.1: slot j predicts x_{n+j}; commit the confident prefix. The block's KV was computed
            # over masks: it must not stay.
            toks, probs = self.sampler.choose(logits, generator)
            if self.config.first_token == "causal":  # logits: the causal one at x_{n-1}, then the block
                t, toks, probs = int(toks[0]), toks[1:], probs[1:]
                if int(toks[0]) != t:  # slots 1.. assumed the block's own slot 0: commit the model's token alone
                    return _Accepted([t], D, n)
            a = confident_prefix(confidence(probs, toks, self.config.confidence), self.config.threshold)
            return _Accepted(toks[:a].tolist(), D, n)
        # §3.2: verify the drafts causally, commit the accepted ones and a bonus token, and take the
        # next drafts from the candidate block that follows the accepted ones.
        k = len(drafts)
        rows = logits.rows if isinstance(logits, _LazyLogits) else lambda a, b: logits[a:b]
        causal = rows(0, k + 1)  # t_i: the AR prediction at x_{n-1}, d_0, .., d_{k-1}
        # then the candidate blocks the step carries (B_0 .. B_k, or those of the block threshold), D rows
        # each: the b-th carried block's slot j is row k + 1 + b * D + j
        slot_of = {i: b for b, i in enumerate(blocks if blocks is not None else range(k + 1))}

        def block(i: int, j0: int, j1: int) -> torch.Tensor:
            return rows(k + 1 + slot_of[i] * D + j0, k + 1 + slot_of[i] * D + j1)

        if self.tree is not None:
            return self._accept_tree(causal, block, drafts, n, generator, slot_of)
        if self.sampler.greedy:
            targets, _ = self.sampler.choose(causal)  # (k+1,)
            a = greedy_accept(drafts, targets.tolist())
            bonus = int(targets[a])
        else:
            p = self.sampler.probs(causal)
            a, bonus = speculative_accept(drafts, draft_q, p, generator)
        # keep x_0..x_{n-1} and the accepted drafts (exact causal KV). B_a starts at position n+a-1;
        # its slot j predicts n+a+j. Slot 0 is replaced by the bonus token, slots 1..D-1 are the
        # drafts for n+a+1 .. n+a+D-1.
        has_block = D > 1 and a in slot_of  # else the next step verifies no drafts
        sure, next_drafts, next_q = self._next_drafts(block, a, bonus, generator) if has_block else ([], [], None)
        proposed = k + (D - 1 if self.config.verify and has_block else 0)
        return _Accepted(list(drafts[:a]) + [bonus] + sure, proposed, n + a, next_drafts, next_q)

    def _next_drafts(self, block, a: int, bonus: int, generator) -> tuple[list[int], list[int], torch.Tensor]:
        """From candidate block ``a`` (slots 1..D-1): the tokens ``verify`` commits at once, then the drafts
        the next step verifies and their distributions."""
        D = self.block_size
        toks, probs = self.sampler.choose(block(a, 1, D), generator)
        sure, drafts, q = [], toks.tolist(), probs
        if self.config.verify:  # commit the confident prefix of the new drafts now; verify the rest next step
            c = confident_run(confidence(probs, toks, self.config.confidence), self.config.threshold)
            # slots 1.. assumed the block's own slot 0: they follow only where it is the committed token
            if c and int(self.sampler.ranked(block(a, 0, 1), 1)[0, 0]) == bonus:
                sure, drafts, q = drafts[:c], drafts[c:], q[c:]
        if self.draft_threshold > 0:  # offer only the drafts likely enough to be accepted
            keep = likely_drafts(q.max(-1).values, self.draft_threshold)
            drafts, q = drafts[:keep], q[:keep]
        return sure, drafts, q

    def _accept_tree(self, causal, block, drafts, n, generator, slot_of) -> "_Accepted":
        """Acceptance over a draft tree (:mod:`sdlm.tree`): walk down while a child holds the model's own
        next token; the bonus is that token at the deepest accepted node, and the next drafts (the
        best-ranked block tokens) come from that node's block (block 0 is the root's).

        Greedy, the model's token is its argmax. Sampling, it is drawn from the model's (warped)
        distribution at each node when the walk reaches it, one draw per committed token, exactly as
        ``ar`` draws it: the output is distributed as AR sampling (and with the same seed it is the
        same), whatever the drafts; they only decide how many tokens one forward commits."""
        from .tree import TreeDrafts, tree_accept

        tree, k = self.tree, len(drafts)
        parents = self._tree_parents(drafts)
        if self.sampler.greedy:
            target = self.sampler.choose(causal)[0].tolist().__getitem__
        else:
            drawn: dict[int, int] = {}

            def target(i: int) -> int:
                if i not in drawn:
                    drawn[i] = int(self.sampler.choose(causal[i : i + 1], generator)[0][0])
                return drawn[i]

        path = tree_accept(parents, drafts, target)
        last = path[-1] if path else -1
        bonus = int(target(last + 1))
        widths = tree.widths
        if last + 1 not in slot_of:  # the block threshold left its block out
            next_drafts = TreeDrafts()
        else:
            logits = block(last + 1, 1, 1 + len(widths))
            joint = None
            if self.draft_threshold > 0 or self.block_threshold > 0:  # the nodes' probabilities are read
                ranked, probs = self.sampler.ranked_with_probs(logits, max(widths))
                probs = probs.tolist()
                # offer only the nodes likely enough to be accepted
                nodes = tree.likely_nodes(probs, self.draft_threshold) if self.draft_threshold > 0 else range(len(tree))
                joint = tree.joint_probs(probs) if self.block_threshold > 0 else None  # what the next layout reads
            else:  # every node: no softmax needed
                ranked, nodes = self.sampler.ranked(logits, max(widths)), range(len(tree))
            tokens = tree.node_tokens(ranked.tolist())
            next_drafts = TreeDrafts([tokens[i] for i in nodes], nodes,
                                     None if joint is None else [joint[i] for i in nodes])
        kept = None if path == list(range(len(path))) else path  # the first nodes: a plain crop keeps them
        return _Accepted([int(drafts[i]) for i in path] + [bonus], k, n + len(path), next_drafts, None, kept)

    def _carried_blocks(self, drafts, draft_q) -> list[int] | None:
        """Which candidate blocks a step carries (:attr:`GenerationConfig.block_threshold`): the chain's by
        accept length, a tree's by anchor (0 the root, ``i + 1`` draft ``i``); None: every one. Read from the
        drafts' top (a tree: joint) probabilities, never from tokens drawn."""
        if self.block_threshold <= 0:
            return None
        if not drafts:
            return [0]
        if self.tree is not None:
            return self.tree.likely_ends(self._tree_nodes(drafts), drafts.joint, self.block_threshold)
        return likely_accept_lengths(draft_q.max(-1).values.tolist(), self.block_threshold)

    def _trim_drafts(self, drafts: list[int], remaining: int) -> list[int]:
        """The drafts a step may verify: the bonus token needs one slot of the length budget, so at most
        ``remaining - 1`` positions are drafted (a tree is cut at that depth, a prefix of its nodes)."""
        room = max(remaining - 1, 0)
        if self.tree is not None:  # breadth-first: the nodes within the depth are a prefix
            depths = self.tree.depths
            return drafts[: sum(1 for i in self._tree_nodes(drafts) if depths[i] <= room)]
        return drafts[:room]

    def _tree_nodes(self, drafts: list[int]) -> Sequence[int]:
        """Which nodes of the tree a step's drafts are: :class:`sdlm.tree.TreeDrafts` says; a plain list
        (no drafts yet) is the tree's first nodes."""
        nodes = getattr(drafts, "nodes", None)
        return range(len(drafts)) if nodes is None else nodes

    def _tree_parents(self, drafts: list[int]) -> list[int]:
        """The parent of each draft of a tree step, as an index into the drafts (-1: the last committed token)."""
        return self.tree.parents_of(self._tree_nodes(drafts))

    # ------------------------------------------------------------ helpers

    def _new_cache(self):
        return new_cache(self.sdlm.device)

    def _check_prompt(self, n_prompt: int) -> None:
        if n_prompt == 0:
            raise SDLMError("the prompt is empty: give at least one token of text")
        limit = self.sdlm.max_positions
        if limit is not None and n_prompt + self.block_size > limit:
            raise SDLMError(
                f"the prompt has {n_prompt} tokens, more than the model's context of {limit} allows "
                f"(with a block of {self.block_size}): shorten the prompt"
            )

    def _max_new(self, n_prompt: int) -> int:
        limit = self.sdlm.max_positions
        max_new = self.config.max_new_tokens
        if limit is not None:
            # the last block reaches position n+D-2 (speculative: n+a+D-1); stay inside the context
            room = limit - n_prompt - self.block_size
            if room < max_new:
                logger.warning("max new tokens cut from %d to %d by the model's context of %d", max_new, room, limit)
                max_new = max(room, 1)
        return max_new

    def _cut_at_stop(self, generated: list[int], new: list[int], text_before: str) -> tuple[list[int], str, bool]:
        """Cut ``new`` after the token that completes a stop string. Returns (tokens kept, text, stopped)."""
        tok = self.sdlm.tokenizer
        for m in range(1, len(new) + 1):
            text = tok.decode(generated + new[:m], skip_special_tokens=True)
            if any(s in text for s in self.config.stop):
                return new[:m], text, True
        return new, text_before, False


class _LazyLogits:
    """A step's logits, computed from its final hidden states for the rows the accept rule reads."""

    def __init__(self, sdlm: SDLM, hidden: torch.Tensor):
        self.sdlm, self.hidden = sdlm, hidden

    def rows(self, a: int, b: int) -> torch.Tensor:
        return self.sdlm.head_logits(self.hidden[a:b])


def _plain_head(sdlm: SDLM) -> bool:
    """Whether the model's logits are its LM head applied to its decoder's final hidden states."""
    try:
        sdlm.lm_head()
    except SDLMError:
        return False
    return decoder_of(sdlm.model) is not None


@dataclass
class _Accepted:
    tokens: list[int]
    """Committed by the step (before the EOS / stop / length cut)."""
    proposed: int
    keep: int
    """Committed tokens whose KV is exact after the step: the cache keeps positions 0 .. keep-1."""
    drafts: list[int] = field(default_factory=list)
    draft_q: torch.Tensor | None = None
    kept_drafts: list[int] | None = None
    """Draft trees: which drafts (tree nodes, by index) were accepted, in order, when they are not
    the first ``keep - n`` drafts; None: the first ones (the cache is cropped as for a chain)."""


def reference_decode(sdlm: SDLM, prompt_ids: Sequence[int], config: GenerationConfig) -> Generation:
    """The slow oracle: the same decoding, every step recomputed from scratch without a cache."""
    cfg = GenerationConfig(**{**config.__dict__, "use_cache": False})
    return Decoder(sdlm, cfg).generate(prompt_ids)


def encode_prompt(sdlm: SDLM, text: str, chat: bool | None = None) -> list[int]:
    """Prompt text -> token ids; with the chat template when the tokenizer has one (``chat=None``)."""
    if not text or not text.strip():
        raise SDLMError("the prompt is empty: give some text to continue")
    tok = sdlm.tokenizer
    use_chat = bool(getattr(tok, "chat_template", None)) if chat is None else chat
    if use_chat:
        if not getattr(tok, "chat_template", None):
            raise SDLMError("this tokenizer has no chat template: drop --chat (prompts are used as plain text)")
        rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        return tok(rendered, add_special_tokens=False)["input_ids"]
    return tok(text)["input_ids"]
