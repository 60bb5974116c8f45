"""Confidence mode over tau: tokens per forward against agreement with the base model, on GSM8K test.

For each threshold tau, decodes the first N GSM8K-test questions in mode ``confidence`` and
reports tokens per forward, how often the output equals the base model's greedy answer
(exactly, and by final answer), and GSM8K accuracy next to the base model's own accuracy on the
same questions. The base answers come from batched greedy ``generate`` (cached in ``--work``).

    python bench/confidence_curve.py --n 200 --taus 0.5 0.7 0.9 0.95 --max-new-tokens 256
    python bench/confidence_curve.py --n 200 --taus 0.9 --verify      # slots below tau verified next step
    python bench/confidence_curve.py --n 200 --taus --speculative     # the lossless mode's count only

Decoding is batched (``--batch-size`` prompts per forward, sdlm.batched; the output equals
one-at-a-time decoding). Any N gives the same columns (say which N when quoting).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "data"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct-sdlm", help="adapter folder or built-in SDLM name")
    ap.add_argument("--base", default="smollm2-135m-instruct", help="base model for the greedy answers")
    ap.add_argument("--gsm8k", default=str(SHARED / "gsm8k" / "test.jsonl"))
    ap.add_argument("--n", type=int, default=20, help="first N test questions")
    ap.add_argument("--taus", type=float, nargs="*", default=[0.5, 0.7, 0.9, 0.95])
    ap.add_argument("--speculative", action="store_true",
                    help="also report lossless speculative decoding's exact tokens per forward on the same questions "
                         "(sdlm.tpf, one forward per question)")
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--first-token", default="block", choices=["block", "causal"],
                    help="who picks each step's first token (GenerationConfig.first_token)")
    ap.add_argument("--verify", action="store_true",
                    help="verify the slots below tau in the next forward (GenerationConfig.verify; the first token "
                         "is then the model's own)")
    ap.add_argument("--confidence", default="prob", choices=["prob", "entropy"],
                    help="the confidence of a slot (SPEC §3.1): its token's probability, or 1 - H/log V")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16, help="prompts decoded together")
    ap.add_argument("--work", default="runs/bench")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from heldout_tpf import greedy_answers
    from sdlm.batched import generate_batch
    from sdlm.cpu import describe_host
    from sdlm.decode import Decoder, GenerationConfig
    from sdlm.distill import _encode
    from sdlm.eval import gsm8k
    from sdlm.model import SDLM

    problems = gsm8k.load(args.gsm8k, limit=args.n)
    golds = [p.gold for p in problems]
    rows = [{"source": "gsm8k-test", "id": i, "question": p.question} for i, p in enumerate(problems)]
    base = SDLM.load(args.base, quiet=True)
    base_rows = greedy_answers(base, f"gsm8k-test-{args.n}", rows, Path(args.work), args.max_new_tokens, args.batch_size)
    del base
    base_text = [r["messages"][-1]["content"] for r in base_rows]
    base_score = gsm8k.score(base_text, golds)

    def save(out: dict) -> None:
        out["machine"] = f"{describe_host()}, float32"
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=2) + "\n")

    sdlm = SDLM.load(args.model, quiet=True)
    tok = sdlm.tokenizer
    eos = set(sdlm.eos_token_ids())
    base_ids = [[t for t in r["answer_ids"] if t not in eos] for r in base_rows]
    out = {"model": args.model, "n": len(problems), "block_size": args.block_size, "first_token": args.first_token,
           "verify": args.verify, "confidence": args.confidence,
           "max_new_tokens": args.max_new_tokens, "base_accuracy": base_score["accuracy"], "taus": {}}
    print(f"base greedy: GSM8K accuracy {base_score['accuracy']:.3f} on {len(problems)} questions")
    if args.speculative:  # the lossless reference: output = the base's, so its accuracy is the base's
        from sdlm.tpf import summarize, tokens_per_forward

        res = [tokens_per_forward(sdlm, _encode(tok, r["messages"][:-1]), r["answer_ids"], args.block_size,
                                  max_new_tokens=args.max_new_tokens) for r in base_rows]
        out["speculative_tokens_per_forward"] = round(summarize(res)["tokens_per_forward"], 3)
        print(f"speculative (lossless), D={args.block_size}: {out['speculative_tokens_per_forward']:.2f} tokens/forward",
              flush=True)
    for tau in args.taus:
        dec = Decoder(sdlm, GenerationConfig(mode="confidence", block_size=args.block_size, threshold=tau,
                                             first_token=args.first_token, verify=args.verify,
                                             confidence=args.confidence,
                                             max_new_tokens=args.max_new_tokens))
        t0 = time.perf_counter()
        gens = generate_batch(dec, [_encode(tok, r["messages"][:-1]) for r in base_rows], args.batch_size,
                              progress=True)
        texts = [g.text for g in gens]
        sc = gsm8k.score(texts, golds)
        same = sum([t for t in g.tokens if t not in eos] == b for g, b in zip(gens, base_ids))  # EOS kept by both or neither
        same_answer = sum(gsm8k.extract_answer(t) == p for t, p in zip(texts, base_score["predictions"]))
        res = {
            "tokens_per_forward": round(sum(g.new_tokens for g in gens) / sum(g.forwards for g in gens), 3),
            "same_output_as_base": same,
            "same_final_answer_as_base": same_answer,
            "accuracy": sc["accuracy"],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        out["taus"][str(tau)] = res
        rule = "verify" if args.verify else args.first_token
        dump = Path(args.work) / f"confidence-{rule}-{args.confidence}-tau{tau}-gsm8k{args.n}.jsonl"
        dump.write_text("".join(json.dumps({"id": i, "tokens": g.tokens, "forwards": g.forwards}) + "\n"
                                for i, g in enumerate(gens)))  # the outputs, to recount agreement later
        print(f"tau={tau}: {res['tokens_per_forward']:.2f} tokens/forward, same output {same}/{len(gens)}, "
              f"same answer {same_answer}/{len(gens)}, accuracy {sc['accuracy']:.3f} "
              f"(base {base_score['accuracy']:.3f})", flush=True)
        save(out)  # after every tau: a long run keeps what it has measured
    save(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
