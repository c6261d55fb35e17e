"""Rollout decode throughput of the engines, against the memory-bandwidth bound and transformers `generate`.

    python scripts/bench_rollout.py --device cuda             # the 336M benchmark model on a GPU
    python scripts/bench_rollout.py --device cpu --engine hf vllm --hidden 512 --layers 8 --heads 8 \\
        --kv-heads 8 --intermediate 1376 --batch 64 --prompt 32 --new-tokens 64 --dtype float32

A random Llama of the given shape decodes `--batch` prompts of exactly `--prompt` random tokens, with
`--new-tokens` new tokens each (eos banned until then: min_new_tokens = new tokens, so every decoder
does the same work), temperature 1, no top-k/top-p. Decoders (`--engine`, default all), interleaved,
medians over `--reps`, each printed as soon as it is measured:

- hf: the HF engine (`rollout.engine.HFDecodeEngine`: the StaticDecoder loop that drops finished rows);
- vllm: the vLLM engine (`rollout.vllm_engine.VLLMEngine`) on the same weights (saved to a temporary
  directory), with prefix caching off so that repetitions do not reuse the prompts' KV;
- hf_eager: transformers `model.generate` with its dynamic cache;
- hf_static_compile: `model.generate` with `cache_implementation="static"` and its automatic compile
  (mode reduce-overhead on CUDA, default on CPU; `--no-hf-compile` skips it, e.g. for a quick CPU run).

The bandwidth bound: each step reads every weight once (all parameters, embedding included) and each
row's KV cache up to its current length, at `--bandwidth` TB/s (default: read from the GPU's name, e.g.
4.8 for an H200, 3.35 for an H100; none on a CPU unless given). Summed over the steps, bound tokens/s =
batch x new tokens / (sum of bytes / bandwidth). The last line printed is JSON.
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
    ap.add_argument("--engine", nargs="+", default=["hf", "vllm", "hf_eager", "hf_static_compile"],
                    choices=["hf", "vllm", "hf_eager", "hf_static_compile"], help="decoders to time")
    ap.add_argument("--bandwidth", type=float, default=None,
                    help="memory bandwidth in TB/s for the bound (default: from the GPU's name; none on a CPU)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per decoder, after one warm-up")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
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


BANDWIDTH_TB_S = {"H200": 4.8, "H100 NVL": 3.9, "H100 PCIe": 2.0, "H100": 3.35, "A100-SXM4-80GB": 2.04,
                  "A100": 1.56, "L40S": 0.864, "A10G": 0.6}  # vendor figures; the first name contained wins


def bandwidth(a) -> float | None:
    """--bandwidth, else the table's figure for this GPU's name (None on a CPU or an unknown GPU)."""
    if a.bandwidth is not None or not a.device.startswith("cuda"):
        return a.bandwidth
    import torch

    name = torch.cuda.get_device_name()
    return next((v for k, v in BANDWIDTH_TB_S.items() if k in name), None)


def hbm_bound(model, a, dtype_bytes: int, tb_s: float) -> dict:
    """Bytes read per decode step (weights, plus the KV cache up to each step's length) -> the bound."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = a.hidden // a.heads
    kv_per_token = a.layers * 2 * a.kv_heads * head_dim * dtype_bytes  # one row, one position, all layers
    total = sum(weights + a.batch * kv_per_token * (a.prompt + t) for t in range(a.new_tokens))
    seconds = total / (tb_s * 1e12)
    return {"weight_bytes": weights, "kv_bytes_per_token": kv_per_token, "bytes_per_step_mean": total / a.new_tokens,
            "tokens_per_s": a.batch * a.new_tokens / seconds}


def vllm_decoder(model, a, prompts: list[list[int]]):
    """The vLLM engine on `model`'s weights (saved to a temporary directory it reads)."""
    import tempfile

    import torch

    from rlhf_dist.rollout.engine import SamplingParams
    from rlhf_dist.rollout.vllm_engine import VLLMEngine

    d = tempfile.mkdtemp(prefix="bench_rollout_")
    model.save_pretrained(d)
    engine = VLLMEngine(d, device="cuda" if a.device.startswith("cuda") else "cpu", dtype=a.dtype,
                        max_model_len=a.prompt + a.new_tokens, seed=0, cpu_kv_cache_gib=2.0)
    sp = SamplingParams(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens)
    g = torch.Generator().manual_seed(0)

    def run():
        engine.llm.reset_prefix_cache()  # each repetition prefills its prompts afresh, as the others do
        return engine.generate(prompts, sp, pad_id=0, eos_id=2, generator=g)
    return run


def decoders(model, a) -> dict:
    """name -> a callable that decodes the batch once (and waits for the device)."""
    import torch

    from rlhf_dist.config.engines import VLLM_INSTALL, installed_engines
    from rlhf_dist.rollout.decode import left_pad
    from rlhf_dist.rollout.engine import HFDecodeEngine, SamplingParams

    g = torch.Generator(device=a.device).manual_seed(0)
    prompts = torch.randint(3, a.vocab, (a.batch, a.prompt), generator=torch.Generator().manual_seed(0)).tolist()
    ids, attn = (x.to(a.device) for x in left_pad(prompts, 0))  # (B, P)
    sp = SamplingParams(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens)
    hf_engine = HFDecodeEngine(model)

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

    def static_compile():
        from transformers import CompileConfig

        cpu = not a.device.startswith("cuda")
        cc = CompileConfig(mode="default" if cpu else "reduce-overhead")
        cc._compile_all_devices = cpu  # transformers compiles on CUDA only unless told (a private flag)
        return lambda: hf(cache_implementation="static", compile_config=cc)

    make = {"hf": lambda: lambda: hf_engine.generate(prompts, sp, pad_id=0, eos_id=2, generator=g),
            "vllm": lambda: vllm_decoder(model, a, prompts), "hf_eager": lambda: hf,
            "hf_static_compile": static_compile}
    names = [n for n in a.engine if not (n == "hf_static_compile" and a.no_hf_compile)]
    if "vllm" in names and "vllm" not in installed_engines():
        print(f"vllm: not installed here, skipped ({VLLM_INSTALL})", flush=True)
        names.remove("vllm")
    return {n: sync(make[n]()) for n in names}


def time_all(fns: dict, reps: int, tokens: int) -> tuple[dict, dict]:
    """A warm-up call per decoder (graphs captured, code compiled: timed on its own), then `reps` interleaved
    rounds. Each decoder's figure is printed once its repetitions are done -> (seconds, first-call seconds)."""
    first_s = {}
    for name, fn in fns.items():
        t = time.perf_counter()
        fn()
        first_s[name] = time.perf_counter() - t
        print(f"{name:>18}: first call {first_s[name]:.2f} s", flush=True)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
            if r == reps - 1:
                print(f"{name:>18}: {tokens / statistics.median(times[name]):10.0f} tokens/s", flush=True)
    return times, first_s


def main(argv=None) -> dict:
    a = parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    model = build_model(a, dtype)
    tb_s = bandwidth(a)
    print(f"model: hidden {a.hidden}, {a.layers} layers, {a.heads} heads / {a.kv_heads} kv heads, intermediate "
          f"{a.intermediate}, vocab {a.vocab}, {a.dtype} on {a.device}; batch {a.batch}, prompt {a.prompt}, "
          f"{a.new_tokens} new tokens", flush=True)
    tokens = a.batch * a.new_tokens
    times, first_s = time_all(decoders(model, a), a.reps, tokens)
    tok_s = {k: tokens / statistics.median(v) for k, v in times.items()}
    result = {"device": a.device, "shape": {k: getattr(a, k) for k in ("hidden", "layers", "heads", "kv_heads",
                                                                      "intermediate", "vocab", "batch", "prompt",
                                                                      "new_tokens", "dtype")},
              "tokens_per_s": tok_s, "first_call_s": first_s,
              "seconds": {k: [round(x, 4) for x in v] for k, v in times.items()}, "bandwidth_tb_s": tb_s}
    if tb_s:
        bound = hbm_bound(model, a, torch.finfo(dtype).bits // 8, tb_s)
        print(f"bandwidth bound at {tb_s} TB/s: {bound['tokens_per_s']:.0f} tokens/s (weights "
              f"{bound['weight_bytes'] / 2**20:.1f} MiB + KV cache, {bound['bytes_per_step_mean'] / 2**20:.1f} MiB "
              f"per step on average); " + ", ".join(f"{k} {100 * v / bound['tokens_per_s']:.2f}%"
                                                    for k, v in tok_s.items()))
        result.update(bound_tokens_per_s=bound["tokens_per_s"],
                      fraction_of_bound={k: v / bound["tokens_per_s"] for k, v in tok_s.items()})
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
