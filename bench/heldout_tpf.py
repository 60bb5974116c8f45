"""Exact greedy speculative tokens per forward on prompts no training saw (SPEC §3.4).

1. The base model's greedy answers to the prompts (batched ``generate``; cached
   in ``--work`` and reused for every adapter and D).
2. For each D: one forward per prompt over prompt + answer with a block at
   every position, replayed through the accept rule = the decoder's forward count.

Prompt sets: GSM8K test (first N), MBPP test prompts (task ids 11-510, first N),
and bench/prompts/chat.jsonl (general questions). None is in the training data.

    python bench/heldout_tpf.py --model smollm2-135m-instruct-sdlm --n 20 --block-sizes 2 4 8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "data"


def prompt_sets(n: int) -> dict[str, list[dict]]:
    sets = {}
    gsm = SHARED / "gsm8k" / "test.jsonl"
    if gsm.is_file():
        rows = [json.loads(l) for l in gsm.read_text().splitlines()[:n]]
        sets["gsm8k-test"] = [{"source": "gsm8k-test", "id": i, "question": r["question"]} for i, r in enumerate(rows)]
    mbpp = SHARED / "mbpp" / "mbpp.jsonl"
    if mbpp.is_file():
        rows = [json.loads(l) for l in mbpp.read_text().splitlines()]
        rows = [r for r in rows if 11 <= r["task_id"] <= 510][:n]
        sets["mbpp-test"] = [{"source": "mbpp-test", "id": r["task_id"],
                              "prompt": f"{r['text']} Your code should pass this test: {r['test_list'][0]}"} for r in rows]
    chat = HERE / "prompts" / "chat.jsonl"
    sets["chat"] = [json.loads(l) for l in chat.read_text().splitlines()[:n]]
    return sets


def greedy_answers(base, name: str, rows: list[dict], work: Path, max_new_tokens: int, batch_size: int) -> list[dict]:
    """The base model's greedy answers to ``rows`` (prompt records with ``id``), in their order.

    Cached in ``work``: ``greedy-<name>-<max_new_tokens>.jsonl`` is resumed and reused by later runs.
    """
    from sdlm.distill import distill, read_prompts

    work.mkdir(parents=True, exist_ok=True)
    src = work / f"prompts-{name}.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dst = work / f"greedy-{name}-{max_new_tokens}.jsonl"
    prompts, _ = read_prompts(src)
    distill(base, prompts, dst, max_new_tokens, batch_size, progress=True)
    done = {str(r["id"]): r for r in map(json.loads, dst.read_text().splitlines())}
    return [done[str(r["id"])] for r in rows]


def heldout_answers(base_name: str, n: int, work: Path, max_new_tokens: int, batch_size: int) -> dict[str, list[dict]]:
    """The base model's greedy answers to every prompt set (:func:`prompt_sets`), cached in ``work``."""
    from sdlm.model import SDLM

    base = SDLM.load(base_name, quiet=True)
    return {name: greedy_answers(base, name, rows, work, max_new_tokens, batch_size)
            for name, rows in prompt_sets(n).items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct-sdlm", help="adapter folder or built-in SDLM name")
    ap.add_argument("--base", default="smollm2-135m-instruct", help="base model for the greedy answers")
    ap.add_argument("--n", type=int, default=20, help="prompts per set")
    ap.add_argument("--block-sizes", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--work", default="runs/bench", help="folder for the cached greedy answers")
    ap.add_argument("--tree", default=None,
                    help="measure the draft-tree decoder (sdlm.tree): auto (the model's calibrated trees), widths "
                         "like 3,2,1, or a JSON file of rank paths; default: the chain")
    ap.add_argument("--draft-threshold", type=float, default=0.0, metavar="P",
                    help="the decoder offering only the leading drafts (with --tree: the nodes) whose joint probability "
                         "is above P (GenerationConfig.draft_threshold; decoding on a CPU defaults to 0.1 for the chain, "
                         "0.2 for trees); default 0: every draft")
    ap.add_argument("--block-threshold", type=float, default=0.0, metavar="P",
                    help="the decoder carrying only the candidate blocks of accept lengths (a tree: of end nodes) at least P "
                         "likely (GenerationConfig.block_threshold; decoding on a CPU defaults to 0.8); "
                         "default 0: every block")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if not 0.0 <= args.draft_threshold < 1.0:
        ap.error("--draft-threshold must be in [0, 1)")
    if not 0.0 <= args.block_threshold <= 1.0:
        ap.error("--block-threshold must be in [0, 1]")

    from sdlm.distill import _encode
    from sdlm.cpu import describe_host
    from sdlm.model import SDLM
    from sdlm.tpf import summarize, tokens_per_forward
    from sdlm.tree import parse_tree

    answers = heldout_answers(args.base, args.n, Path(args.work), args.max_new_tokens, args.batch_size)

    sdlm = SDLM.load(args.model, quiet=True)
    tok = sdlm.tokenizer
    results = {"model": args.model, "n_per_set": args.n, "max_new_tokens": args.max_new_tokens,
               "draft_threshold": args.draft_threshold, "block_threshold": args.block_threshold, "sets": {}}
    trees = {D: parse_tree(args.tree, sdlm.config.draft_trees, D) for D in args.block_sizes}
    if args.tree:
        results["trees"] = {D: {"paths": t.to_json(), "nodes": len(t), "tokens_per_step": 1 + len(t) + (len(t) + 1) * D}
                            for D, t in trees.items() if t is not None}
    t0 = time.perf_counter()
    for name, rows in answers.items():
        results["sets"][name] = {}
        for D in args.block_sizes:
            res = []
            for r in rows:
                prompt = _encode(tok, r["messages"][:-1])
                out = r["answer_ids"]
                res.append(tokens_per_forward(sdlm, prompt, out, D, max_new_tokens=args.max_new_tokens, tree=trees[D],
                                              draft_threshold=args.draft_threshold,
                                              block_threshold=args.block_threshold))
            s = summarize(res)
            results["sets"][name][D] = {"tokens_per_forward": round(s["tokens_per_forward"], 3),
                                        "prompts": s["prompts"], "new_tokens": s["new_tokens"]}
            print(f"{name:12s} D={D}: {s['tokens_per_forward']:.3f} tokens/forward over {s['prompts']} prompts", flush=True)
    allr = {D: [results["sets"][n][D] for n in results["sets"]] for D in args.block_sizes}
    results["overall"] = {D: round(sum(x["new_tokens"] for x in v) / sum(x["new_tokens"] / x["tokens_per_forward"] for x in v), 3)
                          for D, v in allr.items()}
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["machine"] = f"{describe_host()}, float32"
    print(json.dumps(results["overall"]))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
