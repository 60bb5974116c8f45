"""Command line: ``sdlm generate | retrofit | distill | train | calibrate-tree``.

Results go to stdout, diagnostics to stderr. A user mistake prints one line
``sdlm: error: ...`` that names the problem and the fix, and exits with 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from pathlib import Path

from .errors import SDLMError

DEFAULT_MODEL = "smollm2-135m-instruct-sdlm"
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def _add_model_args(p: argparse.ArgumentParser, prepack: bool = True) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="adapter folder, local HF folder, built-in name (smollm2-135m-instruct-sdlm: the base with its "
                        "trained adapter; smollm2-135m-instruct: the bare base), random:<arch>[:<seed>] (a tiny "
                        "random model: llama, qwen2, gemma3_text, gpt2, mixtral and the other tested architectures; an unknown "
                        "name lists them) or Hub id (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights dtype (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    if prepack:
        packing = p.add_mutually_exclusive_group()
        packing.add_argument("--no-prepack", action="store_true",
                             help="on a CPU, run the linear layers on their weights as stored, never on copies "
                                  "prepacked for oneDNN (by default the copies are made where they are the faster: "
                                  "bf16, and float32 except on Intel CPUs, whose MKL products are faster; they take "
                                  "as much memory again as the weights)")
        packing.add_argument("--prepack", action="store_true",
                             help="on a CPU, run the linear layers on oneDNN-packed copies of their weights even where "
                                  "they are not the default")


def _prepack(args):
    """``SDLM.load``'s ``prepack`` for the model arguments: None (where it pays on this CPU), True or False."""
    return True if args.prepack else False if args.no_prepack else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdlm", description="Sequential Diffusion Language Models: several tokens per forward pass.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output on stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for one or more prompts")
    g.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompt text (one generation each)")
    _add_model_args(g)
    g.add_argument("--mode", default="speculative", choices=["ar", "confidence", "speculative"],
                   help="speculative: lossless, the model's own AR output, faster (default); confidence: faster, "
                        "some quality cost (needs a retrofitted model); ar: one token per forward")
    g.add_argument("--threshold", type=float, default=0.9, help="confidence threshold tau in [0, 1] (mode confidence)")
    g.add_argument("--confidence", default="prob", choices=["prob", "entropy"], help="confidence measure")
    g.add_argument("--first-token", default="block", choices=["block", "causal"],
                   help="mode confidence: the first token of each step from the block's slot 0 (block, the paper) "
                        "or from the model's own next-token prediction (causal: closer to the model's own output)")
    g.add_argument("--verify", action="store_true",
                   help="mode confidence: verify the block slots below the threshold in the next forward instead "
                        "of dropping them (each token is the model's own or a confident one; more tokens per forward)")
    g.add_argument("--draft-threshold", type=float, default=None, metavar="P",
                   help="speculative (and confidence --verify): verify only the leading drafts whose joint probability "
                        "stays above P; with --tree, only the tree's nodes whose joint probability is above P (smaller "
                        "forwards; the output is unchanged). Default on a CPU, where a forward costs more the more tokens "
                        "it holds: 0.1 for speculative's chain, 0.2 for its trees; otherwise 0 (every draft)")
    g.add_argument("--block-threshold", type=float, default=None, metavar="P",
                   help="speculative (and confidence --verify): a step carries the candidate block of an accept "
                        "length (with --tree: of a node where the walk may end) only where its drafts make that at least "
                        "P likely, and none where nothing is (smaller forwards; the output is unchanged). Default on a "
                        "CPU: 0.8; otherwise 0 (every block)")
    g.add_argument("--block-size", type=int, default=None, help="block size D (default: the model's trained D)")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--no-chat", action="store_true", help="use prompts as plain text even if the model has a chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    g.add_argument("--batch-size", type=int, default=1,
                   help="decode this many prompts together, one forward per step for all (in float32 the output is "
                        "as with 1, in bf16 close to it; no streaming; default: %(default)s)")
    g.add_argument("--no-row-exact", action="store_true",
                   help="bf16/fp16 on a CPU: run a step's causal rows together with its block rows (one attention "
                        "call per layer) instead of as one-token steps would; a few percent faster, but speculative "
                        "then writes tokens close to bf16 ar's rather than exactly them")
    g.add_argument("--tree", default=None, metavar="SPEC",
                   help="mode speculative, greedy or sampled: verify a tree of draft candidates per step (lossless; more tokens "
                        "per forward for a larger forward; on a CPU each step offers only its likely nodes, see "
                        "--draft-threshold). auto (the model's calibrated tree), widths per depth like 3,2,1, or a JSON "
                        "file of rank paths")
    g.add_argument("--prompts-file", default=None,
                   help="read more prompts from this file, one per line (or JSONL with a 'prompt' field)")

    r = sub.add_parser("retrofit", help="add the mask token and SDLM settings to a model and save it as an HF folder")
    _add_model_args(r, prepack=False)
    r.add_argument("--block-size", type=int, default=4)
    r.add_argument("--out", required=True, help="output folder")

    d = sub.add_parser("distill", help="write self-distilled training data: the model's own greedy answers "
                                       "(batched, resumable)")
    d.add_argument("prompts", help="JSONL of prompts (messages, conversations, prompt, question or text records)")
    d.add_argument("--out", required=True, help="output JSONL (messages records); an existing file is resumed")
    _add_model_args(d)
    d.set_defaults(model="smollm2-135m-instruct")
    d.add_argument("--max-new-tokens", type=int, default=400)
    d.add_argument("--batch-size", type=int, default=16)
    d.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    d.add_argument("--no-progress", action="store_true")

    c = sub.add_parser("calibrate-tree", help="choose the draft tree (--tree) that accepts the most drafts on "
                                              "self-distilled answers; print it, save it to a file or the model")
    c.add_argument("data", nargs="+", help="JSONL files of the model's own greedy answers (sdlm distill output; "
                                           ".gz works)")
    _add_model_args(c)
    c.add_argument("--block-size", type=int, nargs="+", default=[4], help="decoding block sizes D (default: 4)")
    c.add_argument("--nodes", type=int, nargs="+", default=[10],
                   help="tree size in draft tokens, one value or one per block size (default: %(default)s)")
    c.add_argument("--limit", type=int, default=64, help="samples drawn from each file (default: %(default)s)")
    c.add_argument("--seed", type=int, default=0, help="seed of the draw (default: %(default)s)")
    c.add_argument("--top-k", type=int, default=8, help="ranks considered per slot (default: %(default)s)")
    c.add_argument("--out", default=None, help="write the trees as JSON here")
    c.add_argument("--save", action="store_true", help="store the trees in the --model folder's settings (--tree auto)")
    c.add_argument("--no-progress", action="store_true")

    t = sub.add_parser("train", help="train an SDLM from a YAML recipe (resumes from out_dir/checkpoint)")
    t.add_argument("recipe", help="YAML recipe (see recipes/)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    t.add_argument("--no-progress", action="store_true")
    return parser


def cmd_generate(args) -> int:
    from .decode import Decoder, GenerationConfig, encode_prompt
    from .model import SDLM

    cfg = GenerationConfig(
        mode=args.mode, block_size=args.block_size, threshold=args.threshold, confidence=args.confidence,
        first_token=args.first_token, verify=args.verify, draft_threshold=args.draft_threshold,
        block_threshold=args.block_threshold, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=tuple(args.stop), tree=args.tree,
    )
    cfg.validate()  # before the model loads: bad flags fail fast
    prompts = list(args.prompts) + (_read_prompts_file(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise SDLMError("no prompt given: pass prompt text, or --prompts-file FILE")
    for p in prompts:
        if not p.strip():
            raise SDLMError("a prompt is empty: give some text to continue")
    if args.batch_size < 1:
        raise SDLMError(f"--batch-size must be >= 1, got {args.batch_size}")
    sdlm = SDLM.load(args.model, dtype=_dtype(args.dtype), device=args.device, prepack=_prepack(args))
    sdlm.row_exact = not args.no_row_exact
    decoder = Decoder(sdlm, cfg)
    if args.batch_size > 1:
        from .batched import generate_batch

        import time

        ids = [encode_prompt(sdlm, p, chat=False if args.no_chat else None) for p in prompts]
        t0 = time.perf_counter()
        gens = generate_batch(decoder, ids, args.batch_size, progress=len(prompts) > args.batch_size)
        seconds = time.perf_counter() - t0
        for prompt, gen in zip(prompts, gens):
            if args.json:
                print(json.dumps({"prompt": prompt, "mode": cfg.mode, "block_size": decoder.block_size, **gen.to_dict()}))
            else:
                print(gen.text)
                print(f"[{gen.new_tokens} tokens, {gen.forwards} forwards, {gen.tokens_per_forward:.2f} tokens/forward, "
                      f"{cfg.mode}, D={decoder.block_size}]", file=sys.stderr)
        total = sum(g.new_tokens for g in gens)
        print(f"[{len(gens)} prompts, {total} tokens in {seconds:.1f} s: {total / max(seconds, 1e-9):.1f} tokens/s, "
              f"batch size {args.batch_size}]", file=sys.stderr)
        return 0
    for prompt in prompts:
        ids = encode_prompt(sdlm, prompt, chat=False if args.no_chat else None)
        if args.json:
            gen = decoder.generate(ids)
            print(json.dumps({"prompt": prompt, "mode": cfg.mode, "block_size": decoder.block_size, **gen.to_dict()}))
        else:
            gen = _stream_text(decoder, ids)
            print(f"[{gen.new_tokens} tokens, {gen.forwards} forwards, {gen.tokens_per_forward:.2f} tokens/forward, "
                  f"{gen.tokens_per_second:.1f} tokens/s, {cfg.mode}, D={decoder.block_size}]", file=sys.stderr)
        sys.stdout.flush()
    return 0


def _read_prompts_file(path: str) -> list[str]:
    """One prompt per line; JSONL lines with a ``prompt`` field are read as such. Blank lines are skipped."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise SDLMError(f"--prompts-file {path} not found: give a text file with one prompt per line")
    out = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise SDLMError(f"{path}, line {i}: not valid JSON ({e}); use plain text or JSONL") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise SDLMError(f"{path}, line {i}: a JSONL prompt needs a 'prompt' text field")
            out.append(rec["prompt"])
        else:
            out.append(line)
    return out


def _stream_text(decoder, ids):
    """Print committed text as it comes; return the :class:`Generation`."""
    import time

    from .decode import Generation

    start = time.perf_counter()
    tokens, hist, forwards, shown, reason = [], {}, 0, "", "length"
    for step in decoder.stream(ids):
        tokens.extend(step.tokens)
        hist[step.count] = hist.get(step.count, 0) + 1
        forwards += 1
        reason = step.finish_reason or reason
        text = decoder.decode_text(tokens)
        if not text.endswith("\ufffd"):  # wait for a complete UTF-8 character
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    text = decoder.decode_text(tokens)
    sys.stdout.write(text[len(shown):] + "\n")
    return Generation(len(ids), tokens, text, forwards, time.perf_counter() - start, reason, hist)


def cmd_retrofit(args) -> int:
    from .model import SDLM

    sdlm = SDLM.load(args.model, dtype=_dtype(args.dtype), device=args.device, quiet=True, prepack=False)
    sdlm.retrofit(block_size=args.block_size)
    path = sdlm.save(args.out)
    print(json.dumps({"saved": str(path), **sdlm.config.to_dict()}))
    return 0


def cmd_distill(args) -> int:
    from .distill import distill, read_prompts
    from .model import SDLM

    prompts, refused = read_prompts(args.prompts)
    if refused:
        print(f"skipped {refused} MBPP test/validation prompts (never training data)", file=sys.stderr)
    if args.limit is not None:
        prompts = prompts[: args.limit]
    sdlm = SDLM.load(args.model, dtype=_dtype(args.dtype), device=args.device, quiet=True, prepack=_prepack(args))
    stats = distill(sdlm, prompts, args.out, args.max_new_tokens, args.batch_size, progress=not args.no_progress)
    print(json.dumps({"out": args.out, **stats}))
    return 0


def cmd_calibrate_tree(args) -> int:
    from .model import SDLM
    from .train.data import read_records
    from .tree import calibrate, calibration_samples, save_trees

    if any(n < 1 for n in args.nodes) or len(args.nodes) not in (1, len(args.block_size)):
        raise SDLMError(f"--nodes takes one size >= 1 or one per block size, got {args.nodes}")
    nodes = dict(zip(args.block_size, args.nodes * len(args.block_size) if len(args.nodes) == 1 else args.nodes))
    if any(D < 2 for D in args.block_size):
        raise SDLMError("a draft tree needs --block-size >= 2")
    if args.save and not Path(args.model).is_dir():
        raise SDLMError(f"--save writes into a model folder, and {args.model!r} is not one: use --out FILE")
    sdlm = SDLM.load(args.model, dtype=_dtype(args.dtype), device=args.device, quiet=True, prepack=_prepack(args))
    if not sdlm.is_retrofitted:
        raise SDLMError(f"{args.model} has no SDLM settings: a draft tree is calibrated on a retrofitted, trained model")
    if args.limit < 1:
        raise SDLMError(f"--limit must be >= 1, got {args.limit}")
    samples = []
    for path in args.data:
        records = read_records(path)
        random.Random(args.seed).shuffle(records)  # files are often ordered by source: draw across them
        got = calibration_samples(sdlm.tokenizer, records, args.limit)
        if not got:
            raise SDLMError(f"{path} has no records with an assistant answer: give sdlm distill output")
        samples += got
    trees, report = {}, {"model": args.model, "samples": len(samples), "trees": {}}
    positions = sum(len(a) - 1 for _, a in samples if len(a) >= 2)  # answer positions that get drafts
    for D in args.block_size:
        tree, counts = calibrate(sdlm, samples, D, nodes[D], args.top_k, progress=not args.no_progress)
        chain = sum(counts[(0,) * j] for j in range(1, D))
        gain = sum(counts[p] for p in tree.paths)
        trees[D] = tree
        report["trees"][str(D)] = {"paths": tree.to_json(), "nodes": len(tree), "widths": tree.widths,
                                   "drafts_accepted_per_step_chain": round(chain / max(positions, 1), 3),
                                   "drafts_accepted_per_step_tree": round(gain / max(positions, 1), 3)}
    if args.out:
        Path(args.out).write_text(json.dumps({str(D): t.to_json() for D, t in trees.items()}, indent=2) + "\n")
    if args.save:
        report["saved"] = str(save_trees(args.model, trees))
    print(json.dumps(report))
    return 0


def parse_overrides(pairs: list[str]) -> dict:
    """``--set KEY=VALUE`` pairs -> recipe overrides (values read as YAML: numbers, lists, ...)."""
    import yaml

    overrides = {}
    for kv in pairs:
        if "=" not in kv:
            raise SDLMError(f"--set {kv!r}: write KEY=VALUE, e.g. --set steps=200")
        k, v = kv.split("=", 1)
        overrides[k] = yaml.safe_load(v)
    return overrides


def cmd_train(args) -> int:
    from .train.trainer import TrainConfig, Trainer

    cfg = TrainConfig.from_yaml(args.recipe, parse_overrides(args.set))
    trainer = Trainer(cfg)
    result = trainer.run(progress=not args.no_progress)
    if trainer.dist.rank == 0:  # under a launcher, one summary
        print(json.dumps(result), flush=True)
    trainer.dist.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="sdlm: %(levelname)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "accelerate", "peft"):
        logging.getLogger(noisy).setLevel(max(level, logging.ERROR))
    _quiet_warnings()
    try:
        return {"generate": cmd_generate, "retrofit": cmd_retrofit, "distill": cmd_distill, "train": cmd_train,
                "calibrate-tree": cmd_calibrate_tree}[args.command](args)
    except SDLMError as e:
        print(f"sdlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdlm: interrupted", file=sys.stderr)
        return 130


def _quiet_warnings() -> None:
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:  # transformers' own "Loading weights" / "Writing model shards" bars are noise here
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gguf.*")


if __name__ == "__main__":
    sys.exit(main())
