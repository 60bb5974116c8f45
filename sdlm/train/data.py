"""Training data: chat JSONL (``messages`` or ShareGPT ``conversations``), plain text, Hub datasets.

A sample becomes token ids and a loss mask. Chat samples are tokenized turn by
turn exactly as decoding sees them: the prompt part is what
``apply_chat_template(..., add_generation_prompt=True)`` gives, the response
part runs up to and including the end-of-turn token. Long samples are
truncated (keeping the start of the first response) and counted, never dropped
silently.
"""

from __future__ import annotations

import gzip
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from ..errors import SDLMError

logger = logging.getLogger(__name__)

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Example:
    ids: torch.Tensor  # (L,)
    loss_mask: torch.Tensor  # (L,) bool

    @property
    def n_targets(self) -> int:
        return int(self.loss_mask[1:].sum())


@dataclass
class DataStats:
    samples: int = 0
    truncated: int = 0
    empty: int = 0
    tokens: int = 0
    target_tokens: int = 0


def read_records(source: str, split: str = "train") -> list[dict]:
    """JSON lines from a local file (gzip-compressed if it ends in ``.gz``), or rows of a Hub
    dataset (``hf:<name>`` or a Hub id)."""
    path = Path(source)
    if path.is_file():
        records = []
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SDLMError(f"{source}, line {i}: not valid JSON ({e.msg}); fix the line or remove it") from None
        return records
    if path.suffix in {".jsonl", ".json", ".txt", ".gz"} or "/" not in source:
        raise SDLMError(f"data file {source} not found: give a JSONL file (messages / conversations / text)")
    try:
        import datasets

        return list(datasets.load_dataset(source.removeprefix("hf:"), split=split))
    except Exception as e:  # noqa: BLE001
        raise SDLMError(f"could not load dataset {source!r} ({type(e).__name__}); give a local JSONL file") from None


def to_messages(record: dict) -> list[dict] | None:
    """Chat messages of a record in either chat format, or None for a plain-text record."""
    if "messages" in record:
        return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    if "conversations" in record:
        out = []
        for turn in record["conversations"]:
            role = SHAREGPT_ROLES.get(turn.get("from", turn.get("role", "")))
            if role is None:
                raise SDLMError(f"unknown ShareGPT speaker {turn.get('from')!r}: use human / gpt / system")
            out.append({"role": role, "content": turn.get("value", turn.get("content", ""))})
        return out
    if "text" in record:
        return None
    raise SDLMError(f"a data record has none of the keys messages / conversations / text (keys: {sorted(record)[:5]})")


def encode_chat(tokenizer, messages: list[dict], eos_ids: set[int]) -> Example:
    """Tokenize a chat; loss on every assistant response through its end-of-turn token."""
    if not getattr(tokenizer, "chat_template", None):
        raise SDLMError("chat data needs a tokenizer with a chat template; use plain 'text' records instead")
    ids: list[int] = []
    mask: list[bool] = []
    rendered_so_far = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not prompt.startswith(rendered_so_far) or not full.startswith(prompt):
            raise SDLMError("the chat template does not render turns as a prefix of the whole chat; use text data")
        p_ids = tokenizer(prompt[len(rendered_so_far) :], add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
        cut = next((j + 1 for j, t in enumerate(r_ids) if t in eos_ids), len(r_ids))
        r_ids = r_ids[:cut]  # the response ends with its end-of-turn token; what follows is template glue
        ids += p_ids + r_ids
        mask += [False] * len(p_ids) + [True] * len(r_ids)
        rendered_so_far = prompt + tokenizer.decode(r_ids, skip_special_tokens=False)
        if not full.startswith(rendered_so_far):
            rendered_so_far = full
    return Example(torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool))


def encode_text(tokenizer, text: str) -> Example:
    ids = tokenizer(text)["input_ids"]
    return Example(torch.tensor(ids, dtype=torch.long), torch.ones(len(ids), dtype=torch.bool))


def truncate(ex: Example, max_length: int) -> tuple[Example, bool]:
    """Keep at most ``max_length`` tokens, starting so that the first response is kept."""
    L = ex.ids.shape[0]
    if L <= max_length:
        return ex, False
    first = int(torch.nonzero(ex.loss_mask).flatten()[0]) if ex.loss_mask.any() else 0
    start = max(0, min(first - max_length // 2, L - max_length)) if first >= max_length // 2 else 0
    return Example(ex.ids[start : start + max_length], ex.loss_mask[start : start + max_length]), True


def build_examples(records: Iterable[dict], tokenizer, eos_ids: set[int], max_length: int) -> tuple[list[Example], DataStats]:
    stats = DataStats()
    out = []
    for rec in records:
        msgs = to_messages(rec)
        ex = encode_text(tokenizer, rec["text"]) if msgs is None else encode_chat(tokenizer, msgs, eos_ids)
        ex, cut = truncate(ex, max_length)
        stats.truncated += cut
        if ex.n_targets == 0:
            stats.empty += 1  # nothing to learn (e.g. no assistant turn): counted, not used
            continue
        stats.samples += 1
        stats.tokens += ex.ids.shape[0]
        stats.target_tokens += ex.n_targets
        out.append(ex)
    if stats.truncated or stats.empty:
        logger.info("data: %d truncated to %d tokens, %d without targets", stats.truncated, max_length, stats.empty)
    return out, stats
