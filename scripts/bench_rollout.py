"""Rollout decode throughput against the HBM bound, and against transformers `generate` (issue 20).

    python scripts/bench_rollout.py --device cuda             # the issue's benchmark model on a GPU (H200 defaults)
    python scripts/bench_rollout.py --device cpu --hidden 256 --layers 4 --heads 4 --kv-heads 2 \\
        --intermediate 688 --vocab 2048 --batch 16 --prompt 32 --new-tokens 64 --dtype float32 --bandwidth 0.02

A random Llama of the given shape decodes `--batch` prompts of exactly `--prompt` random tokens, with
`--new-tokens` new tokens each (eos banned until then: min_new_tokens = new tokens, so every decoder
does the same work), temperature 1, no top-k/top-p. Decoders, interleaved, medians over `--reps`:

- generate: `rlhf_dist.rollout.generate`, the StaticDecoder loop that drops finished rows (CPU path);
- fixed: `rollout.fixed.FixedDecoder`, rows padded to a power of two, the step a CUDA graph per bucket
  on CUDA (eager on a CPU); what `HFDecodeEngine` uses on CUDA;
- hf_eager: transformers `model.generate` with its dynamic cache;
- hf_static_compile: `model.generate` with `cache_implementation="static"` and its automatic compile
  (mode reduce-overhead on CUDA, default on CPU; `--no-hf-compile` skips it, e.g. for a quick CPU run).

The HBM bound: each step reads every weight once (all parameters, embedding included) and each row's KV
cache up to its current length, at `--bandwidth` TB/s (4.8: an H200's HBM3e). Summed over the steps,
bound tokens/s = batch x new tokens / (sum of bytes / bandwidth). On a CPU the "bound" is that of the
bandwidth given, not a measured one. The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    for name, default in (("hidden", 1024), ("layers", 24), ("heads", 16), ("kv-heads", 4), ("intermediate", 2816),
                          ("vocab", 32000), ("batch", 64), ("prompt", 128), ("new-tokens", 256)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--bandwidth", type=float, default=4.8, help="memory bandwidth in TB/s for the bound (H200: 4.8)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per decoder, after one warm-up")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--check-every", type=int, default=8, help="the fixed decoder's steps between finished checks")
    ap.add_argument("--no-hf-compile", action="store_true", help="skip generate with static cache + compile")
    return ap.parse_args(argv)


def build_model(a, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads,
                      num_key_value_heads=a.kv_heads, intermediate_size=a.intermediate, vocab_size=a.vocab,
                      max_position_embeddings=max(2048, a.prompt + a.new_tokens), pad_token_id=0, bos_token_id=1,
                      eos_token_id=2, tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=a.device, dtype=dtype).eval()


def hbm_bound(model, a, dtype_bytes: int) -> dict:
    """Bytes read per decode step (weights, plus the KV cache up to each step's length) -> the bound."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = a.hidden // a.heads
    kv_per_token = a.layers * 2 * a.kv_heads * head_dim * dtype_bytes  # one row, one position, all layers
    total = sum(weights + a.batch * kv_per_token * (a.prompt + t) for t in range(a.new_tokens))
    seconds = total / (a.bandwidth * 1e12)
    return {"weight_bytes": weights, "kv_bytes_per_token": kv_per_token, "bytes_per_step_mean": total / a.new_tokens,
            "tokens_per_s": a.batch * a.new_tokens / seconds}


def decoders(model, a) -> dict:
    """name -> a callable that decodes the batch once (and waits for the device)."""
    import torch

    from rlhf_dist.rollout.decode import generate, left_pad
    from rlhf_dist.rollout.fixed import FixedDecoder

    g = torch.Generator(device=a.device).manual_seed(0)
    prompts = torch.randint(3, a.vocab, (a.batch, a.prompt), generator=torch.Generator().manual_seed(0)).tolist()
    ids, attn = (x.to(a.device) for x in left_pad(prompts, 0))  # (B, P)
    kw = {"pad_id": 0, "eos_id": 2, "max_new_tokens": a.new_tokens, "min_new_tokens": a.new_tokens, "generator": g}
    fixed = FixedDecoder(model, check_every=a.check_every)

    def sync(fn):
        def run():
            out = fn()
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            return out
        return run

    @torch.no_grad()
    def hf(**extra):
        return model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0, top_k=0,
                              top_p=1.0, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, pad_token_id=0,
                              **extra)

    fns = {"generate": lambda: generate(model, prompts, **kw), "fixed": lambda: fixed.generate(prompts, **kw),
           "hf_eager": hf}
    if not a.no_hf_compile:
        from transformers import CompileConfig

        cpu = not a.device.startswith("cuda")
        cc = CompileConfig(mode="default" if cpu else "reduce-overhead")
        cc._compile_all_devices = cpu  # transformers compiles on CUDA only unless told (a private flag)
        fns["hf_static_compile"] = lambda: hf(cache_implementation="static", compile_config=cc)
    return {k: sync(f) for k, f in fns.items()}


def main(argv=None) -> dict:
    a = parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    model = build_model(a, dtype)
    bound = hbm_bound(model, a, torch.finfo(dtype).bits // 8)
    fns = decoders(model, a)
    first_s = {}
    for name, fn in fns.items():  # warm-up: graphs captured, code compiled (timed on its own)
        t = time.perf_counter()
        fn()
        first_s[name] = time.perf_counter() - t
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(a.reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    tokens = a.batch * a.new_tokens
    tok_s = {k: tokens / statistics.median(v) for k, v in times.items()}
    print(f"model: hidden {a.hidden}, {a.layers} layers, {a.heads} heads / {a.kv_heads} kv heads, intermediate "
          f"{a.intermediate}, vocab {a.vocab}, {a.dtype} on {a.device}; batch {a.batch}, prompt {a.prompt}, "
          f"{a.new_tokens} new tokens")
    print(f"HBM bound at {a.bandwidth} TB/s: {bound['tokens_per_s']:.0f} tokens/s (weights "
          f"{bound['weight_bytes'] / 2**20:.1f} MiB + KV cache, {bound['bytes_per_step_mean'] / 2**20:.1f} MiB per "
          f"step on average)")
    for name, v in tok_s.items():
        print(f"{name:>18}: {v:10.0f} tokens/s  {100 * v / bound['tokens_per_s']:6.2f}% of the bound  "
              f"(first call {first_s[name]:.2f} s)")
    result = {"device": a.device, "shape": {k: getattr(a, k) for k in ("hidden", "layers", "heads", "kv_heads",
                                                                      "intermediate", "vocab", "batch", "prompt",
                                                                      "new_tokens", "dtype")},
              "bandwidth_tb_s": a.bandwidth, "bound_tokens_per_s": bound["tokens_per_s"], "tokens_per_s": tok_s,
              "fraction_of_bound": {k: v / bound["tokens_per_s"] for k, v in tok_s.items()},
              "first_call_s": first_s, "seconds": {k: [round(x, 4) for x in v] for k, v in times.items()}}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
