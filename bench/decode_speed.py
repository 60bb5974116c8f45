"""Decoding speed of each mode against plain AR, in the same run, on the same prompts.

Reports per mode: median tokens/s, pooled tokens per forward, the ratio to `ar`,
and whether the output equals `ar`'s (it must, for `speculative`). Mode ``hf`` is the outside
baseline: ``transformers`` ``generate`` on the bare base model (the adapter switched off), greedy,
one prompt at a time, on the weights as stored.

On a CPU the model's linear layers run on oneDNN-packed weights (``sdlm.cpu``) where ``SDLM.load`` makes them
(not float32 on an Intel CPU with MKL; ``--prepack`` forces them, ``--no-prepack`` turns them off);
``--also-unpacked`` packs them and runs every mode both ways in the same run (rows ``MODE unpacked``).

``--also-plain`` runs every mode again with ``transformers``' own KV cache and sdpa attention instead of this
library's decoding ones (``sdlm.kvcache``, ``sdlm.attention.sdpa_attention``; rows ``MODE plain``). ``--few-shot K``
puts K worked GSM8K-train examples before each prompt: long prompts, where the cache's size tells.

``--also-unfused`` runs every mode again with the gated LoRA layers on ``peft``'s own forward instead of
their shorter inference path (``sdlm.adapter.fuse_gated_inference``; rows ``MODE unfused``).

``--also-lowp-lora`` runs every mode again with a bf16 (or fp16) model's LoRA products on a CPU in that dtype,
as ``peft``'s are, instead of in float32 (``sdlm.adapter.cpu_lora_in_low_precision``; rows ``MODE lowp-lora``).

``--also-checked`` runs every mode again with every linear layer call checking for itself whether it may
take the packed product (``sdlm.cpu.checked_calls``) instead of the decoder's forward vouching for all of
them once (``sdlm.cpu.plain_inference``; rows ``MODE checked``).

    python bench/decode_speed.py --model smollm2-135m-instruct-sdlm --max-new-tokens 128

With ``--batch-size B`` > 1 every mode decodes the prompts B at a time (sdlm.batched) and the speed
is the throughput: all new tokens over the wall time of all batches.

``--interleave`` decodes one prompt at a time in every mode in turn (the order rotated from prompt to
prompt) instead of one mode over all prompts, so that a machine whose speed drifts over minutes slows
every mode alike; each mode then also gets the median over prompts of its speed ratio to ``ar`` on the
same prompt, the figure to compare modes by on a noisy machine.

    python bench/decode_speed.py --n 8 --modes ar speculative:4 speculative:4:chain:draft0.2 --interleave

With ``--temperature`` > 0 every mode samples with the same seed per prompt. A tree
(``speculative:D:auto``) then draws what ``ar`` draws (the same output); the chain samples by the
rejection rule and draws differently (its output is distributed as ``ar``'s, but not the same text).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct-sdlm")
    ap.add_argument("--prompts", default=str(HERE / "prompts" / "chat.jsonl"))
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--modes", nargs="+", default=["ar", "speculative:4", "speculative:8", "confidence:4:0.9"],
                    help="ar, speculative:D, speculative:D:TREE (a draft tree: auto, or widths like 3,2,1), "
                         "confidence:D:tau, confidence:D:tau:causal (the model's own first token), "
                         "confidence:D:tau:verify (slots below tau verified next step); a last part draftP "
                         "(speculative:4:chain:draft0.1) verifies only the leading drafts whose joint probability is above P "
                         "(draft0: every draft; without it, the device's default); a part blockP "
                         "(speculative:4:chain:block0.8) carries only the candidate blocks of accept lengths at least "
                         "P likely (block0: every block)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    ap.add_argument("--batch-size", type=int, default=1, help="decode this many prompts together")
    ap.add_argument("--temperature", type=float, default=0.0, help="> 0 samples (every mode, seeded alike)")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0, help="sampling seed of every prompt and mode")
    ap.add_argument("--no-prepack", action="store_true",
                    help="run every mode on the weights as stored (no oneDNN-packed copies on a CPU)")
    ap.add_argument("--prepack", action="store_true",
                    help="run every mode on oneDNN-packed copies on a CPU even where they are not the default "
                         "(float32 on an Intel CPU with MKL)")
    ap.add_argument("--also-unpacked", action="store_true",
                    help="run every mode twice, with and without the packed copies (rows 'MODE unpacked'), in one run")
    ap.add_argument("--also-unfused", action="store_true",
                    help="run every mode twice, with the gated LoRA layers' inference path and with peft's own "
                         "forward (rows 'MODE unfused'), in one run")
    ap.add_argument("--also-lowp-lora", action="store_true",
                    help="also run every mode with a bf16/fp16 model's LoRA products on a CPU in that dtype instead of "
                         "float32 (rows 'MODE lowp-lora')")
    ap.add_argument("--also-checked", action="store_true",
                    help="run every mode twice, with the decoder's forwards vouching once for their layer calls and "
                         "with every call checking for itself (rows 'MODE checked'), in one run")
    ap.add_argument("--also-plain", action="store_true",
                    help="run every mode twice, with this library's decoding cache and attention and with "
                         "transformers' own (DynamicCache, sdpa copying grouped keys per head; rows 'MODE plain'), "
                         "in one run")
    ap.add_argument("--few-shot", type=int, default=0,
                    help="put this many worked GSM8K-train examples (question and answer) before each prompt: "
                         "a long prompt")
    ap.add_argument("--gsm8k-train", default=str(HERE.parent.parent / "shared" / "data" / "gsm8k" / "train.jsonl"),
                    help="the GSM8K-train file --few-shot takes its examples from")
    ap.add_argument("--interleave", action="store_true",
                    help="one prompt at a time, every mode in turn (order rotated per prompt), so that the machine's "
                         "drift over minutes hits every mode alike; adds the median over prompts of each prompt's "
                         "speed ratio to ar's")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.interleave and args.batch_size > 1:
        ap.error("--interleave times one prompt at a time: drop --batch-size")

    import torch

    from sdlm.adapter import cpu_lora_in_low_precision, unfused_lora
    from sdlm.attention import plain_sdpa
    from sdlm.kvcache import plain_cache
    from sdlm.cpu import checked_calls, describe as describe_cpu, describe_host, packed_layers, packing_off
    from sdlm.decode import Decoder, GenerationConfig, block_threshold_for, draft_threshold_for, encode_prompt
    from sdlm.model import SDLM

    if args.prepack and args.no_prepack:
        ap.error("--prepack and --no-prepack contradict each other: pick one")
    if args.also_unpacked and args.no_prepack:
        ap.error("--also-unpacked compares packed weights with the stored ones: drop --no-prepack")
    sdlm = SDLM.load(args.model, dtype=getattr(torch, args.dtype), device=args.device, quiet=True,
                     prepack=False if args.no_prepack else True if args.prepack or args.also_unpacked else None)
    packed = bool(packed_layers(sdlm.model))
    if args.also_unpacked and not packed:
        raise SystemExit("--also-unpacked compares with packed weights, and none were packed here (not a CPU, or "
                         "a build without oneDNN)")
    rows = [json.loads(l) for l in Path(args.prompts).read_text().splitlines()[: args.n]]
    shots = ""
    if args.few_shot:
        train = [json.loads(l) for l in Path(args.gsm8k_train).read_text().splitlines()[: args.few_shot]]
        shots = "".join(f"Question: {t['question']}\nAnswer: {t['answer']}\n\n" for t in train)
    prompts = [encode_prompt(sdlm, shots + (f"Question: {q}\nAnswer:" if shots else q))
               for q in (r.get("prompt") or r.get("question") for r in rows)]
    for mode in ("ar", "speculative"):  # warm-up
        Decoder(sdlm, GenerationConfig(mode=mode, max_new_tokens=8)).generate(prompts[0])

    if "hf" in args.modes:
        hf_generate(sdlm, prompts[0], 8)  # warm-up

    results, outputs = {}, {}
    variants = [None] + (["unpacked"] if args.also_unpacked else []) + (["unfused"] if args.also_unfused else []) \
        + (["lowp-lora"] if args.also_lowp_lora else []) + (["plain"] if args.also_plain else []) \
        + (["checked"] if args.also_checked else [])
    runs = [(spec, v) for spec in args.modes for v in variants if not (spec == "hf" and v)]

    @contextlib.contextmanager
    def plain_internals():
        with plain_cache(), plain_sdpa():
            yield

    switch = {None: contextlib.nullcontext, "unpacked": packing_off, "unfused": unfused_lora,
              "lowp-lora": cpu_lora_in_low_precision, "plain": plain_internals, "checked": checked_calls}
    label = lambda spec, variant: f"{spec} {variant}" if variant else spec  # noqa: E731
    configs = {}
    for spec, variant in runs:
        parts = spec.split(":")
        mode = parts[0]
        if mode == "hf":
            if args.temperature > 0 or args.batch_size > 1:
                raise SystemExit("mode hf is the greedy one-prompt baseline: drop it, or --temperature / --batch-size")
            configs[label(spec, variant)] = None
            continue
        configs[label(spec, variant)] = GenerationConfig(
            mode=mode, max_new_tokens=args.max_new_tokens,
            block_size=int(parts[1]) if len(parts) > 1 else None,
            threshold=float(parts[2]) if len(parts) > 2 and mode == "confidence" else 0.9,
            tree=parts[2] if len(parts) > 2 and mode == "speculative" else None,
            first_token="causal" if "causal" in parts[3:] else "block", verify="verify" in parts[3:],
            draft_threshold=next((float(x[5:]) for x in parts[3:] if x.startswith("draft")), None),
            block_threshold=next((float(x[5:]) for x in parts[3:] if x.startswith("block")), None),
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)

    def run(spec, variant, chunk):
        """Decode ``chunk`` (prompts) in one mode; returns the generations and the wall time."""
        cfg = configs[label(spec, variant)]
        if cfg is None:
            gens = [hf_generate(sdlm, p, args.max_new_tokens) for p in chunk]
            return gens, sum(g.seconds for g in gens)
        with switch[variant]():
            return run_mode(sdlm, cfg, chunk, args.batch_size)

    gens_of = {label(s, v): [] for s, v in runs}
    if args.interleave:  # prompt by prompt, every mode in turn (the order rotated), so drift hits all alike
        for i, p in enumerate(prompts):
            for spec, variant in runs[i % len(runs):] + runs[: i % len(runs)]:
                gens_of[label(spec, variant)] += run(spec, variant, [p])[0]
        walls = {k: sum(g.seconds for g in gs) for k, gs in gens_of.items()}
    else:
        walls = {}
        for spec, variant in runs:
            gens_of[label(spec, variant)], walls[label(spec, variant)] = run(spec, variant, prompts)
    for key, gens in gens_of.items():
        outputs[key] = [g.tokens for g in gens]
        speed = (sum(g.new_tokens for g in gens) / walls[key] if args.batch_size > 1
                 else statistics.median(g.tokens_per_second for g in gens))
        results[key] = {
            "median_tokens_per_second": round(speed, 2),
            "tokens_per_forward": round(sum(g.new_tokens for g in gens) / sum(g.forwards for g in gens), 3),
            "new_tokens": sum(g.new_tokens for g in gens),
        }
        if configs[key] is not None and configs[key].drafting:  # the threshold in force (a device's default)
            results[key]["draft_threshold"] = draft_threshold_for(configs[key], sdlm.device)
            results[key]["block_threshold"] = block_threshold_for(configs[key], sdlm.device)
    if args.interleave and "ar" in gens_of:  # per prompt against ar's run of the same prompt, then the median
        for key, gens in gens_of.items():
            results[key]["median_prompt_ratio_vs_ar"] = round(statistics.median(
                g.tokens_per_second / a.tokens_per_second for g, a in zip(gens, gens_of["ar"])), 3)
    ar_tokens = outputs.get("ar")
    for spec, r in results.items():
        same = None if ar_tokens is None else sum(a == b for a, b in zip(outputs[spec], ar_tokens))
        r["same_output_as_ar"] = f"{same}/{len(prompts)}" if same is not None else None
    base = results.get("ar", {}).get("median_tokens_per_second")
    for r in results.values():
        r["speed_vs_ar"] = round(r["median_tokens_per_second"] / base, 2) if base else None
    for k, r in results.items():  # packed against unpacked, fused against unfused, own against plain, same mode
        for variant, key in ((" unpacked", "packed_speedup"), (" unfused", "fused_speedup"), (" plain", "own_speedup"),
                             (" checked", "vouched_speedup")):
            if k.endswith(variant) and k[: -len(variant)] in results:
                own = k[: -len(variant)]
                r[key] = round(results[own]["median_tokens_per_second"] / r["median_tokens_per_second"], 2)
                if args.interleave:  # the same prompt both ways, then the median over prompts
                    r[key + "_per_prompt"] = round(statistics.median(
                        a.tokens_per_second / b.tokens_per_second for a, b in zip(gens_of[own], gens_of[k])), 3)
                r["same_output_as_" + own] = f"{sum(a == b for a, b in zip(outputs[own], outputs[k]))}/{len(prompts)}"
    cpu = describe_cpu()
    device = torch.cuda.get_device_name(sdlm.device) if sdlm.device.type == "cuda" else cpu
    out = {"model": args.model, "dtype": args.dtype, "device": device, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
           "few_shot": args.few_shot, "prompt_tokens_median": statistics.median(len(p) for p in prompts),
           "sampling": {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
           if args.temperature > 0 else "greedy",
           "batch_size": args.batch_size, "interleaved": args.interleave,
           "prepacked_linears": packed,
           "speed": "throughput (all tokens / wall time)" if args.batch_size > 1 else "median over prompts",
           "machine": describe_host(),
           "results": results}
    for k, r in results.items():
        print(f"{k:27s} {r['median_tokens_per_second']:7.2f} tok/s  x{r['speed_vs_ar']}  "
              f"{r['tokens_per_forward']:.2f} tok/forward  same as ar: {r['same_output_as_ar']}"
              + (f"  packed x{r['packed_speedup']}" if "packed_speedup" in r else "")
              + (f"  fused x{r['fused_speedup']}" if "fused_speedup" in r else "")
              + (f"  own/plain x{r['own_speedup']}" if "own_speedup" in r else "")
              + (f" (per prompt x{r['own_speedup_per_prompt']})" if "own_speedup_per_prompt" in r else "")
              + (f"  vouched/checked x{r['vouched_speedup']}" if "vouched_speedup" in r else "")
              + (f" (per prompt x{r['vouched_speedup_per_prompt']})" if "vouched_speedup_per_prompt" in r else "")
              + (f"  per-prompt ratio to ar x{r['median_prompt_ratio_vs_ar']}" if "median_prompt_ratio_vs_ar" in r else ""))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def run_mode(sdlm, cfg, prompts, batch_size):
    import time

    from sdlm.batched import generate_batch
    from sdlm.decode import Decoder

    dec = Decoder(sdlm, cfg)
    t0 = time.perf_counter()
    if batch_size > 1:
        gens = generate_batch(dec, prompts, batch_size)
    else:
        gens = [dec.generate(p) for p in prompts]
    return gens, time.perf_counter() - t0


def hf_generate(sdlm, prompt, max_new_tokens):
    """``transformers`` ``generate`` (greedy, with its own KV cache) on the bare base: the adapter off, the
    linear layers on their weights as stored and ``transformers``' own attention (as a user of
    ``transformers`` runs them)."""
    import time

    import torch

    from sdlm.attention import plain_sdpa
    from sdlm.cpu import packing_off
    from sdlm.decode import Generation

    adapter = getattr(sdlm, "adapter", None)
    if adapter is not None:
        adapter.set_active(False)
    x = torch.tensor([prompt], device=sdlm.device)
    if sdlm.device.type == "cuda":
        torch.cuda.synchronize(sdlm.device)
    t0 = time.perf_counter()
    with packing_off(), plain_sdpa():
        out = sdlm.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=sdlm.tokenizer.eos_token_id)
    if sdlm.device.type == "cuda":
        torch.cuda.synchronize(sdlm.device)
    dt = time.perf_counter() - t0
    tokens = out[0, len(prompt):].tolist()
    return Generation(len(prompt), tokens, "", len(tokens), dt, "", {})


if __name__ == "__main__":
    sys.exit(main())
