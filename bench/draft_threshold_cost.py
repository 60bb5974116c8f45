"""Draft thresholds priced: tokens per forward replayed from one forward per prompt, and the wall clock
they buy from step costs timed on this machine.

A chain step that offers ``k`` drafts holds ``1 + k + (k + 1) * D`` tokens (SPEC §3.2), and where a
forward's cost grows with its tokens (a CPU) the drafts that are rarely accepted cost more than they
bring. For each draft threshold (``GenerationConfig.draft_threshold``: offer the leading drafts whose
joint probability stays above it), this replays greedy speculative decoding of the held-out prompts of
``bench/heldout_tpf.py`` (GSM8K test, MBPP test, general chat; the base model's greedy answers, cached
in ``--work``) with :func:`sdlm.tpf.replay`, which gives every step's drafts exactly as the decoder
offers them. Each step is then priced by the time of a decoding forward of its size on this machine
(cached committed tokens, the LM head on the rows the accept rule reads; medians over ``--reps``
rounds, the sizes interleaved), and so is ``ar`` (one token per step). The ratio of the two sums is
the speed the threshold would give against ``ar``, without the per-step work outside the forward.
Confirm a choice with ``bench/decode_speed.py --interleave``.

With ``--tree SPEC`` (``auto``: the model's calibrated trees) the steps verify a draft tree instead, and a
threshold offers its nodes whose joint probability is above it (:meth:`sdlm.tree.DraftTree.likely_nodes`); a
step with ``N`` nodes holds ``1 + N + (N + 1) * D`` tokens.

    python bench/draft_threshold_cost.py --n 16 --block-sizes 4 8 --thresholds 0 0.05 0.1 0.2 0.3
    python bench/draft_threshold_cost.py --n 16 --block-sizes 4 8 --thresholds 0 0.1 0.2 0.3 --tree auto
    python bench/draft_threshold_cost.py --n 16 --block-sizes 4 8 --thresholds 0.1 --block-thresholds 0 0.5 0.8 1

With ``--block-thresholds`` a step carries only the candidate blocks of the accept lengths (a tree: of the nodes
where its walk may end) at least that likely (:attr:`sdlm.decode.GenerationConfig.block_threshold`): a step with
``k`` drafts or nodes and ``b`` blocks holds ``1 + k + b * D`` tokens, and the steps of every such size are timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def step_costs(sdlm, seq: list[int], D: int, reps: int, cached: int = 200, tree=None,
               fewer_blocks: bool = False) -> dict[int, float]:
    """Median seconds of a decoding forward by its tokens: ``ar``'s 1, and a chain step with k = 0 .. D-1
    drafts (``1 + k + (k + 1) * D`` tokens), over ``cached`` committed tokens of ``seq`` (fewer if ``seq``
    is shorter). With a draft ``tree``, its steps with the first N = 0 .. len(tree) nodes instead (``1 + N +
    (N + 1) * D`` tokens). With ``fewer_blocks``, also the steps that carry b = 0 .. k of their k + 1 candidate
    blocks (``1 + k + b * D`` tokens; a block threshold)."""
    from sdlm.kvcache import new_cache
    from sdlm.layout import ar_step, speculative_step
    from sdlm.model import SDLM

    width = len(tree) if tree is not None else D - 1
    cached = min(cached, len(seq) - 1 - width)
    if cached < 1:
        raise SystemExit(f"the prompts and answers are too short to time steps of D = {D}")
    cache = new_cache(sdlm.device)  # the decoder's own
    sdlm.step_hidden(ar_step(seq[:cached], 0), cache, 0)
    mask = sdlm.config.mask_token_id
    steps = {1: (ar_step([seq[cached]], cached), 1)}
    for k in range(width + 1):
        parents = tree.parents[:k] if tree is not None else None
        st = speculative_step([seq[cached]], cached, seq[cached + 1 : cached + 1 + k], D, mask, parents)
        steps[len(st.input_ids)] = (st, k + 1 + D)  # the accept rule reads k + 1 causal rows and one block
        for b in range(k + 1) if fewer_blocks else ():
            st = speculative_step([seq[cached]], cached, seq[cached + 1 : cached + 1 + k], D, mask, parents,
                                  blocks=range(b))
            steps[len(st.input_ids)] = (st, k + 1 + (D if b else 0))  # (k = b = 0 is ar's step)
    times: dict[int, list[float]] = {n: [] for n in steps}
    for r in range(reps + 2):  # two warm-up rounds
        for n, (st, rows) in steps.items():
            t = time.perf_counter()
            h = sdlm.step_hidden(st, cache, cached)
            sdlm.head_logits(h[:rows])
            if r >= 2:
                times[n].append(time.perf_counter() - t)
            SDLM.crop(cache, len(st.input_ids))
    return {n: statistics.median(v) for n, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct-sdlm")
    ap.add_argument("--base", default="smollm2-135m-instruct", help="base model for the greedy answers")
    ap.add_argument("--n", type=int, default=16, help="prompts per set")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--block-sizes", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.15, 0.2, 0.3])
    ap.add_argument("--block-thresholds", type=float, nargs="+", default=[0.0],
                    help="steps that carry only the candidate blocks of accept lengths (a tree: of end nodes) at least "
                         "this likely (GenerationConfig.block_threshold), each with every draft threshold; 0: every block")
    ap.add_argument("--tree", default=None, metavar="SPEC",
                    help="replay draft trees instead of the chain: auto (the model's calibrated tree for each D), "
                         "widths like 3,2,1, or a JSON file of rank paths")
    ap.add_argument("--reps", type=int, default=30, help="timed rounds of every step size")
    ap.add_argument("--batch-size", type=int, default=8, help="for the base model's greedy answers")
    ap.add_argument("--work", default="runs/bench", help="folder for the cached greedy answers")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if any(not 0.0 <= t < 1.0 for t in args.thresholds):
        ap.error("--thresholds must be in [0, 1)")
    if any(not 0.0 <= t <= 1.0 for t in args.block_thresholds):
        ap.error("--block-thresholds must be in [0, 1]")

    from heldout_tpf import heldout_answers
    from sdlm.cpu import describe_host
    from sdlm.distill import _encode
    from sdlm.errors import SDLMError
    from sdlm.model import SDLM
    from sdlm.tpf import block_drafts_and_probs, block_topk_and_probs, replay
    from sdlm.tree import parse_tree

    answers = heldout_answers(args.base, args.n, Path(args.work), args.max_new_tokens, args.batch_size)
    sdlm = SDLM.load(args.model, quiet=True)
    if not sdlm.is_retrofitted:  # as the decoder does: an untrained mask token, drafts that are rarely right
        print(f"{args.model} has no SDLM settings: adding an untrained mask token", flush=True)
        sdlm.retrofit(block_size=max(args.block_sizes))
    tok = sdlm.tokenizer
    seqs = {name: [(_encode(tok, r["messages"][:-1]), r["answer_ids"][: args.max_new_tokens]) for r in rows]
            for name, rows in answers.items()}
    longest = max((p + y for rows in seqs.values() for p, y in rows), key=len)

    out = {"model": args.model, "n_per_set": args.n, "max_new_tokens": args.max_new_tokens,
           "machine": f"{describe_host()}, {sdlm.dtype}",
           "tree": args.tree, "block_sizes": {}}
    print(out["machine"], flush=True)
    for D in args.block_sizes:
        tree = None
        if args.tree:
            try:
                tree = parse_tree(args.tree, sdlm.config.draft_trees, D)
            except SDLMError as e:
                raise SystemExit(f"--tree {args.tree}: {e}")
            print(f"D={D}: tree of {len(tree)} nodes {tree.to_json()}", flush=True)
        cost = step_costs(sdlm, longest, D, args.reps, tree=tree, fewer_blocks=any(args.block_thresholds))
        print(f"D={D}: seconds per forward by its tokens: "
              + ", ".join(f"{n}: {c * 1e3:.1f} ms" for n, c in sorted(cost.items())), flush=True)
        if tree is None:
            blocks = {name: [block_drafts_and_probs(sdlm, p + y, len(p) - 1, D) for p, y in rows]
                      for name, rows in seqs.items()}
        else:
            K = max(tree.widths)
            blocks = {name: [block_topk_and_probs(sdlm, p + y, len(p) - 1, D, K) for p, y in rows]
                      for name, rows in seqs.items()}
        res = {"step_ms": {n: round(c * 1e3, 2) for n, c in sorted(cost.items())}, "thresholds": {}}
        if tree is not None:
            res["tree"] = tree.to_json()
        for bthr in args.block_thresholds:
            for thr in args.thresholds:
                row = {}
                for name, rows in seqs.items():
                    new = fw = 0
                    steps_s = ar_s = 0.0
                    offered: list[int] = []
                    carried: list[int] = []
                    for (p, y), (drafts, probs) in zip(rows, blocks[name]):
                        t = replay(drafts, p + y, len(p), args.max_new_tokens, tree, top_probs=probs, draft_threshold=thr,
                                   block_threshold=bthr)
                        new, fw = new + t.new_tokens, fw + t.forwards
                        offered += t.offered
                        carried += t.blocks
                        # the steps after the prefill
                        steps_s += sum(cost[1 + k + b * D] for k, b in zip(t.offered, t.blocks))
                        ar_s += cost[1] * (t.new_tokens - 1)
                    row[name] = {"tokens_per_forward": round(new / fw, 3), "speed_vs_ar": round(ar_s / steps_s, 3),
                                 "drafts_per_step": round(sum(offered) / max(len(offered), 1), 2),
                                 "blocks_per_step": round(sum(carried) / max(len(carried), 1), 2)}
                if bthr:
                    res.setdefault("block_thresholds", {}).setdefault(bthr, {})[thr] = row
                else:
                    res["thresholds"][thr] = row
                print(f"D={D} threshold {thr:<5}" + (f" block {bthr:<4}" if any(args.block_thresholds) else "") + ": "
                      + "  ".join(f"{name} {r['tokens_per_forward']:.2f} tok/fwd x{r['speed_vs_ar']:.2f} "
                                  f"({r['drafts_per_step']:.1f} drafts, {r['blocks_per_step']:.1f} blocks)"
                                  for name, r in row.items()),
                      flush=True)
        out["block_sizes"][D] = res
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
