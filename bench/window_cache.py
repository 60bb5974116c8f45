"""What dropping the keys a sliding window hides buys: cache size and decoding speed, with and without.

A decoding cache drops from the front of each windowed layer (sliding window, chunk) the keys that no
query of a later forward can see (``SDLM.trim``). This script decodes long prompts with a random-weight
model of the default model's size (SmolLM2-135M's shape, 30 layers, width 576) built as ``--arch``
with a sliding window of ``--window`` on every layer (``mistral``) or on five layers of six
(``gemma3_text``), in each mode, once with the keys dropped and once keeping every key (the code
before), alternating prompt by prompt. It reports the median tokens/s after the prefill (the forward over
the prompt costs the same either way), the ratio, the cache's size at the end of a decoding and whether
both wrote the same tokens (they must).

    python bench/window_cache.py --arch mistral --window 256 --prompt-tokens 2048 --max-new-tokens 64

The speculative rows' tokens per forward are a random model's (its untrained blocks), not a retrofitted one's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="mistral", choices=["mistral", "gemma3_text"])
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--n", type=int, default=3, help="prompts (random token ids)")
    ap.add_argument("--modes", nargs="+", default=["ar", "speculative:4"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    import torch

    from sdlm.decode import Decoder, GenerationConfig
    from sdlm.model import SDLM
    from sdlm.zoo import random_model

    if args.threads:
        torch.set_num_threads(args.threads)
    layers = 30
    settings = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, max_position_embeddings=args.prompt_tokens
                    + args.max_new_tokens + 64, initializer_range=0.02, sliding_window=args.window)
    if args.arch == "gemma3_text":
        settings["layer_types"] = (["sliding_attention"] * 5 + ["full_attention"]) * (layers // 6)
    model, tok = random_model(args.arch, **settings)
    s = SDLM(model, tok, None, name=f"random:{args.arch}")
    s.retrofit(block_size=4)
    s.prepack()
    kinds = s.cache_kinds
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 250, (args.prompt_tokens,), generator=g).tolist() for _ in range(args.n)]

    caches = []
    new_cache = Decoder._new_cache

    def recording(self):
        caches.append(new_cache(self))
        return caches[-1]

    Decoder._new_cache = recording
    rows = {}
    for mode in args.modes:
        name, _, d = mode.partition(":")
        cfg = GenerationConfig(mode=name, block_size=int(d or 4), max_new_tokens=args.max_new_tokens,
                               draft_threshold=0.0)
        speeds, forwards, tokens = {"dropped": [], "kept": []}, 0, 0
        same, held = True, {}
        for i, p in enumerate(prompts):
            outs = {}
            order = ("dropped", "kept") if i % 2 == 0 else ("kept", "dropped")
            for way in order:
                s.cache_kinds = kinds if way == "dropped" else None
                caches.clear()
                steps = Decoder(s, cfg).stream(p)
                first = next(steps)  # the prefill: the same work either way
                t0 = time.perf_counter()
                rest = list(steps)
                speeds[way].append(sum(len(st.tokens) for st in rest) / (time.perf_counter() - t0))
                outs[way] = [t for st in [first, *rest] for t in st.tokens]
                forwards, tokens = forwards + 1 + len(rest), tokens + len(outs[way])
                held[way] = sum(layer.keys.numel() + layer.values.numel() for layer in caches[0].layers) * \
                    caches[0].layers[0].keys.element_size()
            same &= outs["dropped"] == outs["kept"]
        s.cache_kinds = kinds
        med = {k: statistics.median(v) for k, v in speeds.items()}
        rows[mode] = {"tokens_per_s_dropped": round(med["dropped"], 2), "tokens_per_s_kept": round(med["kept"], 2),
                      "ratio": round(med["dropped"] / med["kept"], 3),
                      "cache_mib_dropped": round(held["dropped"] / 2**20, 1),
                      "cache_mib_kept": round(held["kept"] / 2**20, 1), "same_tokens": same,
                      "tokens_per_forward": round(tokens / forwards, 2)}
        print(f"{mode}: {rows[mode]}", flush=True)
    result = {"arch": args.arch, "window": args.window, "prompt_tokens": args.prompt_tokens,
              "max_new_tokens": args.max_new_tokens, "n": args.n, "threads": torch.get_num_threads(), "modes": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if all(r["same_tokens"] for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
