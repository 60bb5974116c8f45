"""``sdlm distill``: self-distilled training data, the base model's own greedy answers.

Block drafts must predict what the base model itself will say, so its own
greedy answers are the natural training targets (SPEC §2). This module reads a
prompt set, generates greedy answers in batches with ``transformers``
``generate`` and appends chat records (``messages`` format, ready for
``sdlm train``) to a JSONL file. A killed run resumes: prompts already in the
output are skipped, and a half-written last line is repaired.

Prompt records (JSONL), by field: ``messages`` / ``conversations`` (a trailing
assistant turn is dropped), ``prompt``, ``question`` (GSM8K) or ``text`` (with
``test_list``: MBPP, the first test appended as in the MBPP paper's prompt).
Each output record also keeps ``answer_ids``, the generated token ids (with the
end-of-turn token when the answer stopped), for exact measurements.
MBPP records with task ids 11-600 (test and validation splits) are refused so
that they never become training data.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SDLMError
from .model import SDLM

logger = logging.getLogger(__name__)

MBPP_HELD_OUT = range(11, 601)  # MBPP test (11-510) and validation (511-600) task ids


@dataclass
class Prompt:
    key: str  # unique within the prompt set: "<source>:<id>"
    source: str
    id: str
    messages: list[dict]


def read_prompts(path: str | os.PathLike, source: str | None = None) -> tuple[list[Prompt], int]:
    """Prompts from a JSONL file; returns (prompts, refused) where refused counts held-out MBPP items."""
    p = Path(path)
    if not p.is_file():
        raise SDLMError(f"prompt file {path} not found: give a JSONL file of prompts")
    src = source or p.stem
    from .train.data import read_records

    out, refused, seen = [], 0, set()
    for i, rec in enumerate(read_records(str(p)), 1):
        rid = str(rec.get("id", rec.get("task_id", i)))
        if "task_id" in rec and "test_list" in rec and int(rec["task_id"]) in MBPP_HELD_OUT:
            refused += 1
            continue
        msgs = _messages(rec)
        if msgs is None:
            raise SDLMError(
                f"{path}, record {i}: no prompt found; give `messages`, `conversations`, `prompt`, `question` or `text`"
            )
        key = f"{rec.get('source', src)}:{rid}"
        if key in seen:
            raise SDLMError(f"{path}, record {i}: duplicate prompt id {key!r}; ids must be unique to resume safely")
        seen.add(key)
        out.append(Prompt(key, str(rec.get("source", src)), rid, msgs))
    return out, refused


def _messages(rec: dict) -> list[dict] | None:
    if "messages" in rec or "conversations" in rec:
        from .train.data import to_messages

        msgs = to_messages(rec)
        while msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        return msgs or None
    for k in ("prompt", "question"):
        if isinstance(rec.get(k), str):
            return [{"role": "user", "content": rec[k]}]
    if isinstance(rec.get("text"), str):
        text = rec["text"]
        if rec.get("test_list"):
            text = f"{text} Your code should pass this test: {rec['test_list'][0]}"
        return [{"role": "user", "content": text}]
    return None


def done_keys(out_path: Path) -> set[str]:
    """Keys already written; a torn last line (a killed write) is cut off."""
    if not out_path.exists():
        return set()
    raw = out_path.read_bytes()
    keep = raw if raw.endswith(b"\n") or not raw else raw[: raw.rfind(b"\n") + 1]
    if len(keep) != len(raw):
        logger.warning("%s: removing a half-written last line", out_path)
        with out_path.open("r+b") as f:
            f.truncate(len(keep))
    keys = set()
    for line in keep.decode().splitlines():
        if line.strip():
            rec = json.loads(line)
            keys.add(f"{rec['source']}:{rec['id']}")
    return keys


@torch.no_grad()
def distill(
    sdlm: SDLM,
    prompts: list[Prompt],
    out_path: str | os.PathLike,
    max_new_tokens: int = 400,
    batch_size: int = 16,
    progress: bool = True,
) -> dict:
    """Greedy answers for every prompt not yet in ``out_path``, appended batch by batch."""
    from tqdm import tqdm

    if batch_size < 1 or max_new_tokens < 1:
        raise SDLMError("batch_size and max_new_tokens must be >= 1")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = done_keys(out)
    todo = [p for p in prompts if p.key not in done]
    tok = sdlm.tokenizer
    eos = sorted(sdlm.eos_token_ids())
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    encoded = [_encode(tok, p.messages) for p in todo]
    # longest first: similar lengths share a batch (less padding), and memory peaks early
    order = sorted(range(len(todo)), key=lambda i: -len(encoded[i]))
    stats = {"prompts": len(prompts), "already_done": len(prompts) - len(todo), "written": 0, "stop": 0, "length": 0}
    bar = tqdm(total=len(todo), disable=not progress, desc="distill", unit="prompt", dynamic_ncols=True)
    model = sdlm.model
    with out.open("a") as f:
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            att = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):  # left padding: every row's answer starts at column `width`
                ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                att[r, width - len(encoded[i]) :] = 1
            gen = model.generate(
                input_ids=ids.to(sdlm.device), attention_mask=att.to(sdlm.device), do_sample=False,
                max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad,
            )[:, width:].cpu()
            for r, i in enumerate(idx):
                row = gen[r].tolist()
                finish, kept = "length", row
                for j, t in enumerate(row):
                    if t in eos:
                        row, kept, finish = row[:j], row[: j + 1], "stop"
                        break
                p = todo[i]
                text = tok.decode(row, skip_special_tokens=True)
                rec = {"source": p.source, "id": p.id, "finish": finish,
                       "messages": p.messages + [{"role": "assistant", "content": text}],
                       "answer_ids": kept}  # the generated ids, with the end-of-turn token when it stopped
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                stats[finish] += 1
                stats["written"] += 1
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(idx))
    bar.close()
    return stats


def _encode(tok, messages: list[dict]) -> list[int]:
    if getattr(tok, "chat_template", None):
        out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return list(out)
    return tok("\n".join(m["content"] for m in messages))["input_ids"]
