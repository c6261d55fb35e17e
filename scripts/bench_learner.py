"""Learner step benchmark: the SFT step and PPO's policy and critic steps on a random Llama, CPU or GPU.

    python scripts/bench_learner.py                      # the issue's 336M Llama, 16k tokens per step, cuda
    python scripts/bench_learner.py --device cpu --hidden 256 --layers 4 --heads 4 --kv-heads 4 \\
        --intermediate 688 --vocab 2048 --tokens 2048 --seq-len 256 --min-len 64 --steps 3

Everything runs through the package's own code: the model is saved as an HF directory and loaded with
`rlhf_dist.models.load.load_causal_lm` (SFT, policy) and `load_scalar_model` (critic), with the attention kernel,
gradient checkpointing and optimizer offload the config would give; the engine is
`rlhf_dist.runtime.distributed.make_engine`; the losses are `steps.sft.sft_loss` over `sft_batch`, and
`steps.update.policy_loss` / `value_loss` over a `steps.records.Experience`; a step is its micro-batches'
`engine.backward(loss, scale_wrt_gas=False)` under `distributed.accumulate`, as the SFT job and the PPO
learners run it.

A step is `--tokens` real tokens on average: n = round(tokens / mean length) sequences in equal micro-batches of
about `--micro-batch` sequences (`step_shape`), lengths fixed at `--seq-len`, or drawn uniformly from [--min-len, --seq-len] when --min-len is
given. Each sequence is a prompt (`--prompt-frac` of it) and a response; SFT trains on the response tokens, PPO
has the prompts left-padded and the responses right-padded, as a rollout gives them. Micro-batches take the
sequences in drawn order and are padded to their longest member; with `--pack N` they are planned by tokens
instead (`packing.plan_micro_batches`, at most N real tokens each) and packed (`packing.pack`), as
`*_max_tokens_per_micro_batch` does in a run.

Figures per phase, over the timed steps (after `--warmup` untimed ones):
- tokens/s: real tokens (prompt + response, padding excluded) per second of wall time of the timed steps
  (the synthetic batches are built before the clock starts; their copies to the device are timed).
- TFLOP/s and MFU against `--peak-tflops` (default 989, dense bf16 of an H100/H200 SXM; give your device's):
  model FLOPs = 6 x N x T + 6 x V x H x T_head + 12 x layers x hidden x sum over sequences of L^2, where N is
  the parameters of the decoder layers and final norm (no embedding table, no output head), T the real
  tokens, V x H the output head (the LM head; the critic's 1-output score head is left out), T_head the
  tokens it projects (SFT: every token; the policy: response tokens only, as the loss projects only those),
  and the last term PaLM's attention count (arXiv:2204.02311, appendix B: 12 x layers x hidden x L per
  token, full L x L scores, no causal halving) for each sequence's own length L. Only real tokens count:
  padding is work the learner does but not model FLOPs. Gradient checkpointing's recomputed forward is not
  counted (model FLOPs, not hardware FLOPs).
- peak memory: on CUDA torch.cuda.max_memory_allocated() over the phase (reset at its start); on CPU the
  process's peak resident set size over the phase (Linux VmHWM, reset at the phase's start through
  /proc/self/clear_refs; elsewhere ru_maxrss, the process's lifetime peak), which includes the process's
  ~0.4-0.5 GB of Python, torch and DeepSpeed, and memory an earlier phase freed but the allocator kept
  (`mem_start_mb`: the same measure at the phase's start).
- padding: the fraction of the micro-batches' positions (rows x padded length, packed rows with --pack) that
  are padding.

The last line printed is JSON with every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PHASES = ("sft", "policy", "critic")
PAD_ID = 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    shape = p.add_argument_group("model shape (default: the issue's 336M Llama)")
    shape.add_argument("--hidden", type=int, default=1024)
    shape.add_argument("--layers", type=int, default=24)
    shape.add_argument("--heads", type=int, default=16)
    shape.add_argument("--kv-heads", type=int, default=4)
    shape.add_argument("--intermediate", type=int, default=2816)
    shape.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--tokens", type=int, default=16384, help="real tokens per optimizer step, on average")
    p.add_argument("--seq-len", type=int, default=1024, help="longest sequence (every sequence without --min-len)")
    p.add_argument("--min-len", type=int, default=None, help="draw lengths uniformly from [min-len, seq-len]")
    p.add_argument("--prompt-frac", type=float, default=0.5, help="share of each sequence that is prompt")
    p.add_argument("--micro-batch", type=int, default=8,
                   help="sequences per micro-batch, as near as a step of --tokens allows")
    p.add_argument("--pack", type=int, default=0, metavar="TOKENS",
                   help="pack micro-batches of at most TOKENS real tokens (the config's *_max_tokens_per_micro_batch)")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=2, help="ZeRO stage (the config's default: 2)")
    p.add_argument("--attn", choices=("sdpa", "eager", "flash_attention_2"), default="sdpa")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (the config's gradient_checkpointing)")
    p.add_argument("--offload", action="store_true", help="ZeRO-Offload of the optimizer (offload_optimizer; zero >= 1)")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per phase")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps per phase first")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the device's peak, for MFU (989: H100/H200 bf16)")
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of sft,policy,critic")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.phases = [x for x in args.phases.split(",") if x]
    bad = [x for x in args.phases if x not in PHASES]
    if bad:
        p.error(f"--phases: unknown {bad}")
    if args.min_len is not None and not 2 <= args.min_len <= args.seq_len:
        p.error("--min-len must be in [2, --seq-len]")
    if args.seq_len < 2:
        p.error("--seq-len must be at least 2 (a prompt token and a response token)")
    if args.offload and args.zero == 0:
        p.error("--offload needs --zero 1, 2 or 3")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible")
    return args


# --- synthetic data ----------------------------------------------------------------------------

def step_shape(args) -> tuple[int, int]:
    """(sequences per micro-batch, micro-batches per step): n = the token budget over the mean length,
    in round(n / --micro-batch) micro-batches of equal size (DeepSpeed's accumulation count is fixed)."""
    mean = args.seq_len if args.min_len is None else (args.min_len + args.seq_len) / 2
    n = max(1, round(args.tokens / mean))
    accum = max(1, round(n / args.micro_batch))
    return max(1, round(n / accum)), accum


def step_size(args) -> int:
    micro, accum = step_shape(args)
    return micro * accum


def draw_step(args, rng: random.Random, vocab: int) -> list[tuple[list[int], int]]:
    """One step's sequences: (token ids, prompt length), lengths fixed or uniform in [min_len, seq_len]."""
    out = []
    for _ in range(step_size(args)):
        L = args.seq_len if args.min_len is None else rng.randint(args.min_len, args.seq_len)
        p = min(L - 1, max(1, round(L * args.prompt_frac)))
        out.append(([rng.randrange(3, vocab) for _ in range(L)], p))
    return out


def micro_batches(seqs: list[tuple[list[int], int]], micro: int, pack: int) -> list[list[tuple[list[int], int]]]:
    """A step's sequences grouped into micro-batches: `micro` sequences each, in order, or with `pack`, at
    most that many real tokens each (`packing.plan_micro_batches`, as a run plans them)."""
    from rlhf_dist.models.packing import micro_batch_indices

    plan = micro_batch_indices([len(ids) for ids, _ in seqs], micro, pack or None)
    return [[seqs[i] for i in b] for b in plan]


def sft_micro(group) -> tuple[dict, int, int]:
    """(sft_batch over the group, real tokens, padded positions); the loss is on the response tokens."""
    from rlhf_dist.data.encode import Encoded
    from rlhf_dist.steps.sft import sft_batch

    items = [Encoded(input_ids=ids, loss_mask=[0] * p + [1] * (len(ids) - p), prompt_len=p) for ids, p in group]
    batch = sft_batch(items, PAD_ID)
    return batch, int(batch["attention_mask"].sum()), batch["input_ids"].numel()


def packed(batch: dict | None, exp=None, one_row: bool = False):
    """The packed layout of a micro-batch (SFT batch dict or PPO Experience), and its token slots."""
    from rlhf_dist.models.packing import pack

    ids, attn = (batch["input_ids"], batch["attention_mask"]) if exp is None else (exp.sequences, exp.attention_mask)
    p = pack(ids, attn, one_row)
    return p, p.input_ids.numel()


def ppo_micro(group, vocab: int, g: torch.Generator):
    """(Experience over the group, real tokens, padded positions): prompts left-padded to the longest prompt,
    responses right-padded to the longest response, as the rollout lays them out; random PPO targets."""
    from rlhf_dist.steps.records import Experience

    P = max(p for _, p in group)
    R = max(len(ids) - p for ids, p in group)
    B = len(group)
    seq = torch.full((B, P + R), PAD_ID, dtype=torch.long)
    attn = torch.zeros(B, P + R, dtype=torch.long)
    action = torch.zeros(B, R, dtype=torch.long)
    for i, (ids, p) in enumerate(group):
        r = len(ids) - p
        seq[i, P - p:P + r] = torch.tensor(ids)
        attn[i, P - p:P + r] = 1
        action[i, :r] = 1

    def rnd() -> torch.Tensor:
        return torch.randn(B, R, generator=g)

    old = -math.log(vocab) + 0.1 * rnd()  # about a random model's logprobs: ratios near 1
    values = 0.1 * rnd()
    exp = Experience(sequences=seq, attention_mask=attn, action_mask=action, prompt_len=P, old_logprobs=old,
                     ref_logprobs=old.clone(), values=values, scores=torch.zeros(B), kl=torch.zeros(B, R),
                     rewards=torch.zeros(B, R), advantages=rnd(), returns=values + rnd(), sample_ids=list(range(B)),
                     version=0)
    return exp, int(attn.sum()), seq.numel()


# --- model, FLOPs, memory ------------------------------------------------------------------------

def write_model(args, out_dir: Path) -> Path:
    """A random Llama of the given shape as an HF directory (safetensors), read back by the package's loaders."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         intermediate_size=args.intermediate, max_position_embeddings=max(args.seq_len, 2048),
                         pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(args.seed)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(out_dir, safe_serialization=True)
    del model
    gc.collect()
    return out_dir


def flop_params(model) -> tuple[int, int]:
    """(N: parameters of the decoder layers and final norm, V x H: the LM head's; 0 for a scalar model)."""
    from rlhf_dist.models.load import backbone, unwrap

    base = backbone(unwrap(model))
    n = sum(p.numel() for name, p in base.named_parameters() if not name.startswith("embed_tokens"))
    head = unwrap(model).get_output_embeddings() if hasattr(unwrap(model), "lm_head") else None
    return n, (head.weight.numel() if head is not None else 0)


def _hwm_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _cpu_peak_mb() -> float:
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def memory_start(device: str) -> tuple[str, float]:
    """(what the peak measures, the same measure now, at the phase's start: MB)."""
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return "torch.cuda.max_memory_allocated", torch.cuda.memory_allocated() / 2**20
    kind = "peak RSS (VmHWM, reset per phase)" if _hwm_reset() else "peak RSS (ru_maxrss, process lifetime)"
    return kind, _status_mb("VmRSS") or 0.0


def memory_peak_mb(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _cpu_peak_mb()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# --- one phase -------------------------------------------------------------------------------------

def make_step(phase: str, args, rng: random.Random, g: torch.Generator, micro: int, n_body: int, n_head: int) -> dict:
    """One optimizer step's micro-batches, built before the clock starts, and its real tokens and FLOPs."""
    from rlhf_dist.algo import loss_units

    seqs = draw_step(args, rng, args.vocab)
    groups = micro_batches(seqs, micro, args.pack)
    one_row = args.attn != "eager"  # packing.one_row
    if phase == "sft":
        batches = [sft_micro(gr) for gr in groups]
        if args.pack:
            batches = [({**b, "packed": pk}, r, n) for b, r, _ in batches for pk, n in [packed(b, None, one_row)]]
        norm = float(sum(b["loss_mask"][:, 1:].sum() for b, _, _ in batches))  # the step's loss tokens
    else:
        batches = [ppo_micro(gr, args.vocab, g) for gr in groups]
        if args.pack:
            batches = [((e, pk), r, n) for e, r, _ in batches for pk, n in [packed(None, e, one_row)]]
        else:
            batches = [((e, None), r, n) for e, r, n in batches]
        resp = torch.cat([e.action_mask.flatten() for (e, _), _, _ in batches])
        norm = float(loss_units(resp[None], "token_mean"))  # the step's response tokens
    lengths = [len(ids) for ids, _ in seqs]
    head_tokens = sum(lengths) if phase == "sft" else sum(len(ids) - p for ids, p in seqs)
    flops = (6 * n_body * sum(lengths) + 6 * (n_head if phase != "critic" else 0) * head_tokens
             + 12 * args.layers * args.hidden * sum(L * L for L in lengths))
    return {"batches": [b for b, _, _ in batches], "norm": norm, "real": sum(r for _, r, _ in batches),
            "padded": sum(n for _, _, n in batches), "flops": flops}


def run_step(phase: str, engine, step: dict) -> None:
    """The step's micro-batches, each to the device, forward and backward, then one optimizer step."""
    from rlhf_dist.runtime.distributed import accumulate
    from rlhf_dist.steps.sft import sft_loss
    from rlhf_dist.steps.update import policy_loss, value_loss

    dev = engine.device
    batches = step["batches"]
    for i in accumulate(engine, len(batches)):
        b = batches[i]
        if phase == "sft":
            loss, _ = sft_loss(engine.module, {k: v.to(dev) for k, v in b.items()}, step["norm"])
        else:
            e, pk = b
            mb = dataclasses.replace(e, **{k: v.to(dev) for k, v in vars(e).items() if isinstance(v, torch.Tensor)})
            pk = pk and pk.to(dev)
            if phase == "policy":
                loss, _ = policy_loss(engine.module, mb, clip_range=0.2, entropy_coef=0.0, temperature=1.0,
                                      units=step["norm"], packed=pk)
            else:
                loss, _ = value_loss(engine.module, mb, clip_range=0.2, units=step["norm"], packed=pk)
        engine.backward(loss, scale_wrt_gas=False)


def run_phase(phase: str, args, model_dir: Path) -> dict:
    from rlhf_dist.models.load import enable_gradient_checkpointing, load_causal_lm, load_scalar_model
    from rlhf_dist.runtime.distributed import make_engine

    mem_kind, mem_start = memory_start(args.device)
    bf16 = args.dtype == "bf16"
    model = (load_scalar_model(str(model_dir), bf16, PAD_ID, args.attn) if phase == "critic"
             else load_causal_lm(str(model_dir), bf16, args.attn))
    if args.grad_ckpt:
        enable_gradient_checkpointing(model)
    n_body, n_head = flop_params(model)
    n_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    micro, accum = step_shape(args)
    engine = make_engine(model, lr=1e-5, total_steps=args.warmup + args.steps, warmup_steps=0,
                         micro_batch=micro, grad_accum=accum, zero_stage=args.zero, grad_clip=1.0,
                         bf16=bf16, constant_lr=True, offload_optimizer=args.offload)
    rng, g = random.Random(args.seed + PHASES.index(phase)), torch.Generator().manual_seed(args.seed)
    for _ in range(args.warmup):
        run_step(phase, engine, make_step(phase, args, rng, g, micro, n_body, n_head))
    steps = [make_step(phase, args, rng, g, micro, n_body, n_head) for _ in range(args.steps)]
    times = []
    for step in steps:
        sync(args.device)
        t0 = time.perf_counter()
        run_step(phase, engine, step)
        sync(args.device)
        times.append(time.perf_counter() - t0)
    secs = sum(times)
    real = sum(s["real"] for s in steps)
    padded = sum(s["padded"] for s in steps)
    tflops = sum(s["flops"] for s in steps) / secs / 1e12
    # the engine and model go with this frame: main collects them before the next phase
    return {"tokens_per_s": real / secs, "tflops": tflops, "mfu": tflops / args.peak_tflops,
            "peak_mem_mb": memory_peak_mb(args.device), "mem_start_mb": mem_start, "memory": mem_kind,
            "padding_fraction": 1 - real / padded, "step_s": secs / args.steps, "step_times_s": times,
            "real_tokens_per_step": real / args.steps, "sequences_per_step": micro * accum, "micro_batch": micro,
            "micro_batches_per_step": sum(len(s["batches"]) for s in steps) / args.steps, "params": n_params,
            "flop_params": n_body, "flop_head_params": n_head if phase != "critic" else 0}


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch.distributed as dist

    from rlhf_dist.roles.calls import free_port
    from rlhf_dist.runtime.distributed import init_local_group_env

    init_local_group_env(0, 1, "127.0.0.1", free_port())
    if args.device == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=0, world_size=1)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_learner_") as tmp:
        model_dir = write_model(args, Path(tmp) / "model")
        for phase in args.phases:
            r = results[phase] = run_phase(phase, args, model_dir)
            gc.collect()
            print(f"{phase:7s} {r['tokens_per_s']:10.1f} tokens/s  {r['tflops']:8.4f} TFLOP/s  "
                  f"MFU {100 * r['mfu']:6.3f}% of {args.peak_tflops:g}  peak mem {r['peak_mem_mb']:8.1f} MB "
                  f"(from {r['mem_start_mb']:.1f} MB at the start; {r['memory']})  padding {100 * r['padding_fraction']:5.1f}%  step {r['step_s']:.3f} s",
                  flush=True)
    dist.destroy_process_group()
    settings = {k: v for k, v in vars(args).items()}
    settings["threads"] = torch.get_num_threads()
    settings["torch"] = torch.__version__
    settings["gpu"] = torch.cuda.get_device_name(0) if args.device == "cuda" else None
    report = {"settings": settings, "phases": results}
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
