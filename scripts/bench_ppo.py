"""PPO throughput benchmark: rlhf-dist against TRL's PPOTrainer on the same model, data and shapes.

    python scripts/bench_ppo.py                 # rlhf-dist, then TRL if installed (pip install -e .[bench])
    python scripts/bench_ppo.py --rounds 2      # interleave: ours, TRL, ours, TRL; medians over all rounds
    python scripts/bench_ppo.py --no-trl
    python scripts/bench_ppo.py --decode        # rollout decode loop against transformers `generate`
    python scripts/bench_ppo.py --no-trl --set ppo_recompute_old_logprobs=true   # a before/after row

The workload is fixed: a random Llama (hidden 256, 4 layers, 4 heads, intermediate 688, vocab 2048,
about 4.2M parameters) as policy, critic and reward model; 16 prompts of exactly 32 tokens per
iteration; 64 new tokens each at temperature 1 (eos is masked until then, so every response has 64
tokens in both systems); 1 PPO epoch of 2 mini-batches; 10 timed iterations after 1 warm-up. The last
line printed is JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

HIDDEN, LAYERS, HEADS, INTERMEDIATE, VOCAB = 256, 4, 4, 688, 2048
PROMPTS, PROMPT_LEN, NEW_TOKENS, MINI_BATCHES = 16, 32, 64, 2
WARMUP, TIMED = 1, 10
CPUS = os.cpu_count() or 2


# ---------------------------------------------------------------------------------------
# Assets: tokenizer, models, prompts of exactly PROMPT_LEN tokens
# ---------------------------------------------------------------------------------------

def build_assets(work: Path) -> dict:
    """Tokenizer + random policy and reward model in HF format, and a pool of 32-token prompts."""
    import torch
    from transformers import AutoConfig, LlamaForSequenceClassification

    from rlhf_dist.data import encode_prompt
    from rlhf_dist.tiny import build_tiny

    # The demo text alone gives ~600 BPE tokens; the stdlib's `email` package brings the vocab to 2048.
    extra = tuple(f.read_text(errors="ignore") for f in sorted(Path(sysconfig.get_paths()["stdlib"], "email").glob("*.py")))
    paths = build_tiny(work / "tiny", seed=0, vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS,
                       num_heads=HEADS, intermediate_size=INTERMEDIATE, extra_texts=extra)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths["model"])
    config = AutoConfig.from_pretrained(paths["model"])
    assert config.vocab_size == VOCAB, config.vocab_size
    config.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        rm = LlamaForSequenceClassification(config)
    rm_dir = work / "reward"
    rm.save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)

    # Prompts: word windows of the demo text whose chat-templated encoding is exactly PROMPT_LEN tokens.
    words = " ".join(json.loads(line)["prompt"] if line.startswith("{") else json.loads(line)
                     for line in Path(paths["prompts"]).read_text().splitlines()).split()
    prompts, ids = [], []
    start = 0
    while len(prompts) < 4 * PROMPTS and start < len(words):
        for k in range(1, 64):
            msgs = [{"role": "user", "content": " ".join(words[start:start + k])}]
            n = len(encode_prompt(tok, msgs))
            if n >= PROMPT_LEN:
                if n == PROMPT_LEN:
                    prompts.append(msgs)
                    ids.append(encode_prompt(tok, msgs))
                break
        start += 7
    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": m[0]["content"]}) + "\n" for m in prompts))
    return {"model": str(paths["model"]), "reward": str(rm_dir), "prompts": str(data), "prompt_ids": ids,
            "pad": tok.pad_token_id, "eos": tok.eos_token_id}


# ---------------------------------------------------------------------------------------
# rlhf-dist
# ---------------------------------------------------------------------------------------

def run_ours(assets: dict, work: Path, overrides: list[str]) -> dict:
    from rlhf_dist.checkpoint import atomic_dir
    from rlhf_dist.config import load_config
    from rlhf_dist.pipeline import ray_session
    from rlhf_dist.ppo import run_ppo
    from rlhf_dist.tracking import read_metrics

    save = Path(tempfile.mkdtemp(dir=work, prefix="ours-"))
    # The standard layout: SFT policy (also the reference and the critic's start) and the reward model.
    for src, dst in ((assets["model"], save / "sft" / "best_model"), (assets["reward"], save / "reward_model" / "best_model")):
        with atomic_dir(dst) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
    cfg = load_config({
        "model_name": assets["model"], "device": "cpu", "seed": 0, "max_length": PROMPT_LEN + NEW_TOKENS,
        "ppo_data_path": assets["prompts"], "ppo_iterations": WARMUP + TIMED, "ppo_batch_size": PROMPTS,
        "ppo_mini_batch_size": PROMPTS // MINI_BATCHES, "ppo_epochs": 1, "gen_max_new_tokens": NEW_TOKENS,
        "gen_min_new_tokens": NEW_TOKENS, "gen_temperature": 1.0, "save_interval": 1000, "save_dir": str(save),
        "log_level": "WARNING", "wandb": {"mode": "disabled"},
        # Threads per actor fit the cores: the rollout has the machine to itself during its phase;
        # the two learners train side by side. Ray's CPU count is logical, so bundles may add up past it.
        "roles": {"rollout": {"num_cpus": CPUS}, **{r: {"num_cpus": max(1, CPUS // 2)}
                                                     for r in ("policy", "critic", "reference", "reward")}},
        "cluster": {"num_cpus": 3 * CPUS},
    }, overrides)
    with ray_session(cfg):
        run_ppo(cfg, "cpu")
    rows = read_metrics(save / "ppo" / "metrics.jsonl")
    its = [r for r in rows if not r.get("summary")][WARMUP:]
    summary = next(r for r in rows if r.get("summary"))
    return {"seconds": [r["seconds"] for r in its],
            "phases": {p: statistics.median(r[f"time/{p}"] for r in its)
                       for p in ("rollout", "experience", "advantages", "learner", "sync")},
            "tokens": [float(r["response_length"]) * PROMPTS for r in its],
            "peak_memory_mb": summary["peak_memory_mb"]}


# ---------------------------------------------------------------------------------------
# TRL (in a child process of its own: its threads and memory are its own)
# ---------------------------------------------------------------------------------------

def trl_child(assets_json: str) -> None:
    import resource

    import torch
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    assets = json.loads(Path(assets_json).read_text())
    torch.set_num_threads(CPUS)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(assets["model"])
    policy = AutoModelForCausalLM.from_pretrained(assets["model"])
    ref = AutoModelForCausalLM.from_pretrained(assets["model"])
    value = AutoModelForSequenceClassification.from_pretrained(assets["model"], num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(assets["reward"], num_labels=1)
    ids = assets["prompt_ids"]
    dataset = Dataset.from_dict({"input_ids": [ids[i % len(ids)] for i in range(len(ids))]})

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_train_begin(self, *a, **k):
            self.marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            self.marks.append(time.perf_counter())

    clock = Clock()
    args = PPOConfig(
        output_dir=str(Path(assets_json).parent / "trl-out"), per_device_train_batch_size=PROMPTS // MINI_BATCHES,
        gradient_accumulation_steps=MINI_BATCHES, num_mini_batches=MINI_BATCHES, num_ppo_epochs=1,
        total_episodes=PROMPTS * (WARMUP + TIMED), response_length=NEW_TOKENS, temperature=1.0, stop_token=None,
        missing_eos_penalty=None, kl_coef=0.05, learning_rate=1e-5, bf16=False, fp16=False, use_cpu=True,
        report_to="none", save_strategy="no", logging_steps=10_000, num_sample_generations=0, seed=0,
        local_rollout_forward_batch_size=PROMPTS, dataloader_num_workers=0)
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=dataset, value_model=value, callbacks=[clock])
    trainer.train()
    deltas = [b - a for a, b in zip(clock.marks, clock.marks[1:])]
    print("TRL_RESULT " + json.dumps({"seconds": deltas[WARMUP:], "tokens": [PROMPTS * NEW_TOKENS] * TIMED,
                                      "peak_memory_mb": {"trainer": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))


def run_trl(assets_json: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--trl-child", str(assets_json)], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("TRL_RESULT "):
            return json.loads(line[len("TRL_RESULT "):])
    raise RuntimeError(f"TRL run failed (exit {out.returncode}):\n{out.stderr[-4000:]}")


# ---------------------------------------------------------------------------------------
# Decode: our rollout loop against transformers `generate`
# ---------------------------------------------------------------------------------------

def bench_decode(assets: dict, reps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_dist.rollout import generate, left_pad

    torch.set_num_threads(CPUS)
    model = AutoModelForCausalLM.from_pretrained(assets["model"]).eval()
    prompts = assets["prompt_ids"][:PROMPTS]
    ids, attn = left_pad(prompts, assets["pad"])  # (B, P)
    g = torch.Generator().manual_seed(0)

    def ours():
        generate(model, prompts, pad_id=assets["pad"], eos_id=assets["eos"], max_new_tokens=NEW_TOKENS,
                 min_new_tokens=NEW_TOKENS, generator=g)

    @torch.no_grad()
    def hf():
        model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                       max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=assets["pad"])

    times: dict[str, list[float]] = {"ours": [], "hf_generate": []}
    for rep in range(reps + 1):  # interleaved; rep 0 warms up both
        for name, fn in (("ours", ours), ("hf_generate", hf)):
            t = time.perf_counter()
            fn()
            if rep:
                times[name].append(time.perf_counter() - t)
    tok_s = {k: PROMPTS * NEW_TOKENS / statistics.median(v) for k, v in times.items()}
    return {"decode_tokens_per_s": tok_s, "ratio": tok_s["ours"] / tok_s["hf_generate"],
            "seconds": {k: [round(x, 4) for x in v] for k, v in times.items()}}


# ---------------------------------------------------------------------------------------

def summarize(name: str, runs: list[dict]) -> dict:
    secs = [s for r in runs for s in r["seconds"]]
    toks = [t for r in runs for t in r["tokens"]]
    med = statistics.median(secs)
    out = {"s_per_iteration": med, "samples_per_s": PROMPTS / med, "tokens_per_s": statistics.median(toks) / med,
           "iterations": len(secs), "round_medians": [statistics.median(r["seconds"]) for r in runs],
           "peak_memory_mb": runs[-1]["peak_memory_mb"]}
    if "phases" in runs[0]:
        out["phases"] = {p: statistics.median(r["phases"][p] for r in runs) for p in runs[0]["phases"]}
    print(f"\n== {name}: {len(secs)} timed iterations")
    print(f"s/iteration (median) {med:.3f}   samples/s {out['samples_per_s']:.1f}   generated tokens/s "
          f"{out['tokens_per_s']:.0f}   round medians {[round(x, 3) for x in out['round_medians']]}")
    for p, v in out.get("phases", {}).items():
        print(f"  {p:<11} {v:.3f} s  ({100 * v / med:.0f}%)")
    print("  peak memory (MB): " + "  ".join(f"{k}={v:.0f}" for k, v in out["peak_memory_mb"].items()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds of each system (default 1)")
    ap.add_argument("--no-trl", action="store_true", help="skip TRL even when it is installed")
    ap.add_argument("--decode", action="store_true", help="benchmark the decode loop only")
    ap.add_argument("--reps", type=int, default=5, help="decode repetitions per system (default 5)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides for rlhf-dist, e.g. zero_stage=0 (for before/after comparisons)")
    ap.add_argument("--trl-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trl_child:
        return trl_child(args.trl_child)
    os.environ.setdefault("WANDB_MODE", "disabled")
    with tempfile.TemporaryDirectory(prefix="bench-ppo-") as tmp:
        work = Path(tmp)
        assets = build_assets(work)
        print(f"workload: Llama hidden {HIDDEN}, {LAYERS} layers, {HEADS} heads, intermediate {INTERMEDIATE}, "
              f"vocab {VOCAB}; {PROMPTS} prompts x {PROMPT_LEN} tokens, {NEW_TOKENS} new tokens, 1 epoch x "
              f"{MINI_BATCHES} mini-batches; {WARMUP} warm-up + {TIMED} timed iterations; {CPUS} CPUs")
        if args.decode:
            result = bench_decode(assets, args.reps)
            d = result["decode_tokens_per_s"]
            print(f"decode tokens/s: ours {d['ours']:.0f}, transformers generate {d['hf_generate']:.0f}, "
                  f"ratio {result['ratio']:.2f}")
            print(json.dumps(result))
            return
        use_trl = not args.no_trl and importlib.util.find_spec("trl") is not None
        if not args.no_trl and not use_trl:
            print("trl is not installed (pip install -e .[bench]); running rlhf-dist only")
        assets_json = work / "assets.json"
        assets_json.write_text(json.dumps(assets))
        ours, theirs = [], []
        for r in range(args.rounds):
            t = time.time()
            ours.append(run_ours(assets, work, args.set))
            print(f"round {r + 1}: rlhf-dist done in {time.time() - t:.0f}s", flush=True)
            if use_trl:
                t = time.time()
                theirs.append(run_trl(assets_json))
                print(f"round {r + 1}: TRL done in {time.time() - t:.0f}s", flush=True)
        result = {"rlhf_dist": summarize("rlhf-dist", ours)}
        if theirs:
            result["trl"] = summarize("TRL 1.12 PPOTrainer", theirs)
            result["ratio_samples_per_s"] = result["rlhf_dist"]["samples_per_s"] / result["trl"]["samples_per_s"]
            print(f"\nrlhf-dist / TRL samples/s: {result['ratio_samples_per_s']:.2f}x")
        print(json.dumps(result))


if __name__ == "__main__":
    main()
