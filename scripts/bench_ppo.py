"""PPO throughput benchmark: rlhf-dist against TRL's PPOTrainer on the same model, data and shapes.

    pip install -e .[bench]                     # TRL 1.12, the last release with PPOTrainer
    python scripts/bench_ppo.py --rounds 2      # ours, TRL, ours, TRL: medians over all rounds, and the ratio
    python scripts/bench_ppo.py --ab ppo_overlap_rollout=false roles.rollout.num_workers=2
                                                # also the on-policy variant (each --ab: our config with overrides)
    python scripts/bench_ppo.py --decode        # the rollout's decode loop, eager and compiled, against `generate`
    python scripts/bench_ppo.py --calls         # each call of one iteration alone, 1 thread: the work per iteration
    python scripts/bench_ppo.py --quick ...     # 3 timed iterations instead of 10, for development

The workload is fixed: a random Llama (hidden 256, 4 layers, 4 heads, intermediate 688, vocab 2048,
about 4.2M parameters) as policy, critic and reward model; 16 prompts of exactly 32 tokens per
iteration; 64 new tokens each at temperature 1, with eos banned before 64 (min_new_tokens) in both
systems, so every response has exactly 64 tokens; 1 PPO epoch of 2 mini-batches (2 optimizer steps);
10 timed iterations after 1 warm-up. This machine's speed drifts between runs of the same work, so
systems run interleaved (--rounds) and are compared by medians. The last line printed is JSON.
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
WARMUP = 1
CPUS = os.cpu_count() or 2

# rlhf-dist's settings for this machine (zero_stage and the rollout split are measured in docs/benchmarks.md;
# --ab KEY=VALUE runs a variant beside them):
OUR_SETTINGS = {
    # One learner worker per role: ZeRO has nothing to shard, and stage 2's bucketing costs ~0.15 s/iteration.
    "zero_stage": 0,
    # The next iteration's rollout runs during this one's experience and learner phases (one-step
    # off-policy). One rollout worker decodes all 16 prompts: a decode step costs about the same for 8 rows
    # as for 16, so a second worker would only take CPU from the update. The on-policy figure:
    # --ab ppo_overlap_rollout=false roles.rollout.num_workers=2
    "ppo_overlap_rollout": True,
    # Single-threaded actors: at these sizes a second thread gains little and a busy core makes it wait.
    # Ray's CPU count is logical, so bundles may add up past the cores.
    "roles": {"rollout": {"num_workers": 1, "num_cpus": 1},
              **{r: {"num_cpus": 1} for r in ("policy", "critic", "reference", "reward")}},
    "cluster": {"num_cpus": 3 * CPUS},
}


# ---------------------------------------------------------------------------------------
# Assets: tokenizer, models, prompts of exactly PROMPT_LEN tokens
# ---------------------------------------------------------------------------------------

def build_assets(work: Path) -> dict:
    """Tokenizer + random policy and reward model in HF format, and a pool of 32-token prompts."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    from rlhf_dist.data.encode import encode_prompt
    from rlhf_dist.demo.tiny import build_tiny

    # The demo text alone gives ~600 BPE tokens; the stdlib's `email` package brings the vocab to 2048.
    extra = tuple(f.read_text(errors="ignore") for f in sorted(Path(sysconfig.get_paths()["stdlib"], "email").glob("*.py")))
    paths = build_tiny(work / "tiny", seed=0, vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS,
                       num_heads=HEADS, intermediate_size=INTERMEDIATE, extra_texts=extra)
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
    prompts = exact_length_prompts(tok, Path(paths["prompts"]), encode_prompt)
    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    ids = [encode_prompt(tok, [{"role": "user", "content": p}]) for p in prompts]
    return {"model": str(paths["model"]), "reward": str(rm_dir), "prompts": str(data), "prompt_ids": ids,
            "pad": tok.pad_token_id, "eos": tok.eos_token_id}


def exact_length_prompts(tok, prompts_file: Path, encode_prompt) -> list[str]:
    """4 x PROMPTS word windows of the demo prompts whose chat-templated encoding is exactly PROMPT_LEN."""
    rows = [json.loads(line) for line in prompts_file.read_text().splitlines()]  # {"prompt": text} or text
    words = " ".join(r["prompt"] if isinstance(r, dict) else r for r in rows).split()
    out: list[str] = []
    for start in range(0, len(words), 7):
        for k in range(1, 64):
            text = " ".join(words[start:start + k])
            n = len(encode_prompt(tok, [{"role": "user", "content": text}]))
            if n >= PROMPT_LEN:
                if n == PROMPT_LEN:
                    out.append(text)
                break
        if len(out) == 4 * PROMPTS:
            return out
    raise RuntimeError(f"only {len(out)} prompts of exactly {PROMPT_LEN} tokens in {prompts_file}")


# ---------------------------------------------------------------------------------------
# rlhf-dist: run_ppo on a local Ray, timings from save_dir/ppo/metrics.jsonl
# ---------------------------------------------------------------------------------------

def run_ours(assets: dict, work: Path, timed: int, overrides: list[str]) -> dict:
    from rlhf_dist.config import load_config
    from rlhf_dist.io.checkpoint import atomic_dir, mark_stage_finished
    from rlhf_dist.io.tracking import read_metrics
    from rlhf_dist.online.driver import run_ppo
    from rlhf_dist.pipeline import ray_session

    save = Path(tempfile.mkdtemp(dir=work, prefix="ours-"))
    # The standard layout: SFT policy (also the reference and the critic's start) and the reward model.
    for src, dst in ((assets["model"], save / "sft" / "best_model"), (assets["reward"], save / "reward_model" / "best_model")):
        with atomic_dir(dst) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
        mark_stage_finished(dst)
    cfg = load_config({
        "model_name": assets["model"], "device": "cpu", "seed": 0, "max_length": PROMPT_LEN + NEW_TOKENS,
        "ppo_data_path": assets["prompts"], "ppo_iterations": WARMUP + timed, "ppo_batch_size": PROMPTS,
        "ppo_mini_batch_size": PROMPTS // MINI_BATCHES, "ppo_epochs": 1, "gen_max_new_tokens": NEW_TOKENS,
        "gen_min_new_tokens": NEW_TOKENS, "gen_temperature": 1.0, "save_interval": 1000, "save_dir": str(save),
        "log_level": "WARNING", "wandb": {"mode": "disabled"}, **OUR_SETTINGS,
    }, overrides)
    with ray_session(cfg):
        run_ppo(cfg, "cpu")
    rows = read_metrics(save / "ppo" / "metrics.jsonl")
    its = [r for r in rows if not r.get("summary")][WARMUP:]
    summary = next(r for r in rows if r.get("summary"))
    shutil.rmtree(save)
    return {**generated(its), "phases": {p: statistics.median(r[f"time/{p}"] for r in its)
                                         for p in ("rollout", "experience", "advantages", "learner", "sync")},
            "peak_memory_mb": summary["peak_memory_mb"]}


def generated(rows: list[dict]) -> dict[str, list[float]]:
    """Seconds, samples and tokens of each iteration row, as the run generated them (the driver logs them as
    rates over the iteration's seconds): an override of the batch (--set, --ab) changes them."""
    return {"seconds": [r["seconds"] for r in rows],
            "samples": [round(r["samples_per_s"] * r["seconds"]) for r in rows],
            "tokens": [r["tokens_per_s"] * r["seconds"] for r in rows]}


# ---------------------------------------------------------------------------------------
# TRL, in a child process of its own (its threads and memory are its own)
# ---------------------------------------------------------------------------------------

def trl_child(assets_json: str) -> None:
    import resource

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    assets = json.loads(Path(assets_json).read_text())
    timed = assets["timed"]
    torch.set_num_threads(assets["trl_threads"])
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(assets["model"])
    policy = AutoModelForCausalLM.from_pretrained(assets["model"])
    # TRL's generation config leaves min_new_tokens unset, so generate() takes it from the model's:
    # eos banned before 64 tokens, as in ours.
    policy.generation_config.min_new_tokens = NEW_TOKENS
    ref = AutoModelForCausalLM.from_pretrained(assets["model"])
    value = AutoModelForSequenceClassification.from_pretrained(assets["model"], num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(assets["reward"], num_labels=1)
    dataset = Dataset.from_dict({"input_ids": assets["prompt_ids"]})

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_train_begin(self, *a, **k):
            self.marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            self.marks.append(time.perf_counter())

    clock = Clock()
    # Batch 16 = per_device_train_batch_size x gradient_accumulation_steps; 2 mini-batches of 8, one optimizer
    # step each (with 8 x 2 accumulation TRL would step once per iteration). bf16=False: TRL's default
    # bf16 fails on a CPU-only machine. stop_token None + missing_eos_penalty None: all 64 tokens count.
    args = PPOConfig(
        output_dir=str(Path(assets_json).parent / "trl-out"), per_device_train_batch_size=PROMPTS,
        gradient_accumulation_steps=1, num_mini_batches=MINI_BATCHES, num_ppo_epochs=1,
        total_episodes=PROMPTS * (WARMUP + timed), response_length=NEW_TOKENS, temperature=1.0, stop_token=None,
        missing_eos_penalty=None, kl_coef=0.05, learning_rate=1e-5, bf16=False, fp16=False, use_cpu=True,
        report_to="none", save_strategy="no", logging_steps=10_000, num_sample_generations=0, seed=0,
        local_rollout_forward_batch_size=PROMPTS, dataloader_num_workers=0)
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=dataset, value_model=value, callbacks=[clock])
    trainer.train()
    seconds = [b - a for a, b in zip(clock.marks, clock.marks[1:])][WARMUP:]
    print("TRL_RESULT " + json.dumps({"seconds": seconds, "samples": [PROMPTS] * len(seconds),
                                      "tokens": [PROMPTS * NEW_TOKENS] * len(seconds),
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

def interleaved(fns: dict, reps: int) -> dict[str, list[float]]:
    """Seconds of each call, the functions taking turns so that a drift in machine speed hits all alike;
    a first round warms up untimed."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(reps + 1):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            if rep:
                times[name].append(time.perf_counter() - t)
    return times


def bench_decode(assets: dict, reps: int, threads: int) -> dict:
    """Interleaved repetitions of: rollout.generate (static decoder, eager and compiled), the same with the
    model's own forward and a DynamicCache, and model.generate. Same model, batch, thread count and sampling
    (temperature 1, no top-k/top-p, exactly 64 new tokens)."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_dist.rollout.decode import generate, left_pad

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(assets["model"]).eval()
    prompts = assets["prompt_ids"][:PROMPTS]
    ids, attn = left_pad(prompts, assets["pad"])  # (B, P)
    g = torch.Generator().manual_seed(0)

    def ours(static: bool, compiled: bool = False):
        return lambda: generate(model, prompts, pad_id=assets["pad"], eos_id=assets["eos"], max_new_tokens=NEW_TOKENS,
                                min_new_tokens=NEW_TOKENS, generator=g, static=static, compiled=compiled)

    @torch.no_grad()
    def hf():
        model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                       max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=assets["pad"])

    fns = {"ours": ours(True), "ours_compiled": ours(True, compiled=True), "ours_generic_forward": ours(False),
           "hf_generate": hf}
    t = time.perf_counter()
    fns["ours_compiled"]()  # torch.compile's first call, timed on its own
    compile_s = time.perf_counter() - t
    times = interleaved(fns, reps)
    tok_s = {k: PROMPTS * NEW_TOKENS / statistics.median(v) for k, v in times.items()}
    return {"threads": threads, "decode_tokens_per_s": tok_s, "ratio": tok_s["ours"] / tok_s["hf_generate"],
            "ratio_compiled": tok_s["ours_compiled"] / tok_s["hf_generate"], "compile_s": compile_s,
            "seconds": {k: [round(x, 4) for x in v] for k, v in times.items()}}


def _calls_batches(samples, g) -> list:
    """The rollout's samples as an Experience (random whitened advantages and returns from `g`), in
    MINI_BATCHES micro-batches."""
    import torch

    from rlhf_dist.algo import masked_whiten
    from rlhf_dist.steps.records import Experience

    mask = samples.action_mask.float()  # (B, R)
    exp = Experience(samples.sequences, samples.attention_mask, samples.action_mask, samples.prompt_len,
                     samples.rollout_logprobs, samples.rollout_logprobs,
                     torch.zeros_like(mask), torch.zeros(PROMPTS), torch.zeros_like(mask), torch.zeros_like(mask),
                     masked_whiten(torch.randn(mask.shape, generator=g), mask), torch.randn(mask.shape, generator=g),
                     samples.sample_ids, 0)
    micro = PROMPTS // MINI_BATCHES
    return [exp.select(list(range(i, i + micro))) for i in range(0, PROMPTS, micro)]


def _update_call(model, loss_fn, batches: list):
    """-> one update call: a loss, backward and optimizer step per micro-batch."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)

    def call():
        for mb in batches:
            loss_fn(model, mb)[0].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return call


def bench_calls(assets: dict, reps: int) -> dict:
    """Each call of one iteration, alone in this process on one thread, through the functions the actors run:
    the rollout, the three experience forwards and both updates (2 micro-batches each; a fused torch AdamW
    step stands in for DeepSpeed's ZeRO-0 one). Their sum is the CPU time an iteration needs on idle cores."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_dist.models.load import load_scalar_model, sequence_scores
    from rlhf_dist.rollout.decode import generate
    from rlhf_dist.steps.forwards import response_logprobs, response_values
    from rlhf_dist.steps.update import policy_loss, value_loss

    torch.set_num_threads(1)
    rollout_model, reference = (AutoModelForCausalLM.from_pretrained(assets["model"]).eval().requires_grad_(False)
                                for _ in range(2))
    reward = load_scalar_model(assets["reward"], pad_token_id=assets["pad"]).eval().requires_grad_(False)
    policy = AutoModelForCausalLM.from_pretrained(assets["model"])
    critic = load_scalar_model(assets["model"], pad_token_id=assets["pad"])
    g = torch.Generator().manual_seed(0)
    prompts = assets["prompt_ids"][:PROMPTS]

    def rollout():
        return generate(rollout_model, prompts, pad_id=assets["pad"], eos_id=assets["eos"], max_new_tokens=NEW_TOKENS,
                        min_new_tokens=NEW_TOKENS, generator=g)

    samples = rollout()
    seq, attn, P = samples.sequences, samples.attention_mask, samples.prompt_len  # (B, P+R)
    batches = _calls_batches(samples, g)

    calls = {
        "rollout (16 x 64 new tokens)": rollout,
        "reference logprobs": torch.no_grad()(lambda: response_logprobs(reference, seq, attn, P)),
        "critic values (2 micro-batches)": torch.no_grad()(
            lambda: [response_values(critic, mb.sequences, mb.attention_mask, P) for mb in batches]),
        "reward model scores": torch.no_grad()(lambda: sequence_scores(reward, seq, attn)),
        "policy update (2 micro-batches)": _update_call(policy, lambda m, mb: policy_loss(
            m, mb, clip_range=0.2, entropy_coef=0.0, temperature=1.0), batches),
        "critic update (2 micro-batches)": _update_call(critic, lambda m, mb: value_loss(m, mb, clip_range=0.2),
                                                        batches),
    }
    med = {k: statistics.median(v) for k, v in interleaved(calls, reps).items()}
    for k, v in med.items():
        print(f"  {k:<34} {v:.3f} s")
    total = sum(med.values())
    print(f"  {'sum: CPU seconds per iteration':<34} {total:.3f} s  (on {CPUS} cores: at least {total / CPUS:.3f} s "
          f"per iteration)")
    return {"call_seconds": med, "sum_s": total}


# ---------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------

def summarize(name: str, runs: list[dict]) -> dict:
    secs, samples, toks = ([x for r in runs for x in r[k]] for k in ("seconds", "samples", "tokens"))
    med = statistics.median(secs)
    out = {"s_per_iteration": med, "samples_per_s": statistics.median(samples) / med,
           "tokens_per_s": statistics.median(toks) / med,
           "iterations": len(secs), "round_medians": [statistics.median(r["seconds"]) for r in runs],
           "peak_memory_mb": {k: max(r["peak_memory_mb"][k] for r in runs) for k in runs[0]["peak_memory_mb"]}}
    if "phases" in runs[0]:
        out["phases"] = {p: statistics.median(r["phases"][p] for r in runs) for p in runs[0]["phases"]}
    print(f"\n== {name}: {len(secs)} timed iterations in {len(runs)} rounds")
    print(f"s/iteration (median) {med:.3f}   samples/s {out['samples_per_s']:.2f}   generated tokens/s "
          f"{out['tokens_per_s']:.0f}   round medians {[round(x, 3) for x in out['round_medians']]}")
    for p, v in out.get("phases", {}).items():
        print(f"  {p:<11} {v:.3f} s  ({100 * v / med:.0f}%)")
    print("  peak memory (MB, max RSS): " + "  ".join(f"{k}={v:.0f}" for k, v in out["peak_memory_mb"].items()))
    return out


def run_rounds(systems: dict, rounds: int) -> dict[str, list[dict]]:
    """Every system once per round, in turn, so a drift in machine speed hits all of them alike."""
    runs: dict[str, list[dict]] = {name: [] for name in systems}
    for r in range(rounds):
        for name, fn in systems.items():
            t = time.time()
            runs[name].append(fn())
            print(f"round {r + 1}/{rounds}: {name} done in {time.time() - t:.0f}s", flush=True)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of each system (default 2)")
    ap.add_argument("--quick", action="store_true", help="3 timed iterations per round instead of 10")
    ap.add_argument("--no-trl", action="store_true", help="skip TRL even when it is installed")
    ap.add_argument("--trl-threads", type=int, default=CPUS, help=f"torch threads for TRL (default {CPUS})")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for rlhf-dist")
    ap.add_argument("--ab", nargs="+", action="append", default=[], metavar="KEY=VALUE",
                    help="also run rlhf-dist with these overrides, interleaved (a before/after row); repeatable")
    ap.add_argument("--decode", action="store_true", help="benchmark the decode loop only")
    ap.add_argument("--calls", action="store_true", help="time each call of one iteration alone (1 thread)")
    ap.add_argument("--reps", type=int, default=7, help="--decode and --calls repetitions (default 7)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for --decode, both systems (default 1)")
    ap.add_argument("--trl-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trl_child:
        return trl_child(args.trl_child)
    os.environ.setdefault("WANDB_MODE", "disabled")
    timed = 3 if args.quick else 10
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-ppo-") as tmp:
        work = Path(tmp)
        assets = build_assets(work)
        print(f"workload: Llama hidden {HIDDEN}, {LAYERS} layers, {HEADS} heads, intermediate {INTERMEDIATE}, "
              f"vocab {VOCAB}; {PROMPTS} prompts x {PROMPT_LEN} tokens, {NEW_TOKENS} new tokens, 1 epoch x "
              f"{MINI_BATCHES} mini-batches; {WARMUP} warm-up + {timed} timed iterations; {CPUS} CPUs; "
              f"load average {load_before:.2f}", flush=True)
        if args.decode:
            result = bench_decode(assets, args.reps, args.threads)
            d = result["decode_tokens_per_s"]
            print(f"decode tokens/s ({args.threads} thread(s)): ours {d['ours']:.0f}, ours compiled "
                  f"{d['ours_compiled']:.0f} (compile and first call {result['compile_s']:.1f} s), ours with the "
                  f"generic forward {d['ours_generic_forward']:.0f}, transformers generate {d['hf_generate']:.0f}; "
                  f"ours / generate {result['ratio']:.2f}x, compiled / generate {result['ratio_compiled']:.2f}x")
        elif args.calls:
            print("each call alone, 1 thread, medians:")
            result = bench_calls(assets, args.reps)
        else:
            result = bench_ppo(args, assets, work, timed)
    result["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(result))


def bench_ppo(args, assets: dict, work: Path, timed: int) -> dict:
    use_trl = not args.no_trl and importlib.util.find_spec("trl") is not None
    if not args.no_trl and not use_trl:
        print("trl is not installed (pip install -e .[bench]); running rlhf-dist only")
    systems = {"rlhf-dist": lambda: run_ours(assets, work, timed, args.set)}
    for ab in args.ab:
        systems[f"rlhf-dist {' '.join(ab)}"] = lambda ab=ab: run_ours(assets, work, timed, args.set + ab)
    if use_trl:
        assets_json = work / "assets.json"
        assets_json.write_text(json.dumps({**assets, "timed": timed, "trl_threads": args.trl_threads}))
        systems["TRL 1.12 PPOTrainer"] = lambda: run_trl(assets_json)
    runs = run_rounds(systems, args.rounds)
    result: dict = {"settings": {"ours": OUR_SETTINGS, "set": args.set}}
    for name, r in runs.items():
        result[name] = summarize(name, r)
    base = result["rlhf-dist"]["samples_per_s"]
    print()
    for name in list(runs)[1:]:
        ratio = base / result[name]["samples_per_s"]
        result[f"ratio_samples_per_s vs {name}"] = ratio
        print(f"rlhf-dist / {name} samples/s: {ratio:.2f}x")
    return result


if __name__ == "__main__":
    main()
