"""SFT and reward-model stages: Ray Train jobs with DeepSpeed inside.

The steps (`sft_loss`, `reward_loss`) are plain functions of a model and a batch; `supervised_worker` is
the Ray Train loop that wraps them with DeepSpeed, sharding and evaluation. Both losses are normalised
by the *global* count of the optimizer step (tokens for SFT, pairs for RM), so 1 worker and 2 workers,
or micro-batches and gradient accumulation, follow the same trajectory.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .algo import logprobs_from_logits, pairwise_ranking_loss
from .checkpoint import (atomic_dir, is_complete, mark_stage_finished, mark_stage_started, remove_stale_temps, safe_join,
                         warn_if_unfinished)
from .config import RLHFConfig, load_config
from .data import (Encoded, ReadStats, check_special_tokens, read_dataset, split_eval, tokenize_preferences,
                   tokenize_sft)
from .models import load_causal_lm, load_scalar_model, load_tokenizer, position_ids_from_mask, save_hf, sequence_scores
from .precision import use_bf16

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# Batches and steps (single-process, no Ray, no DeepSpeed)
# ---------------------------------------------------------------------------------------

def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids (B, T), attention mask (B, T)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def sft_batch(items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    ids, attn = pad_right([e.input_ids for e in items], pad_id)  # (B, T)
    loss_mask, _ = pad_right([e.loss_mask for e in items], 0)  # (B, T)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask}


def sft_count(items: list[Encoded]) -> int:
    """Tokens that carry loss (the label of position t is token t+1, so the first token never does)."""
    return sum(sum(e.loss_mask[1:]) for e in items)


def sft_loss(model, batch: dict[str, torch.Tensor], norm: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum of assistant-token NLL divided by `norm` (the optimizer step's global token count)."""
    ids, attn = batch["input_ids"], batch["attention_mask"]  # (B, T)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn),
                   use_cache=False).logits  # (B, T, V)
    logp = logprobs_from_logits(logits[:, :-1], ids[:, 1:])  # (B, T-1)
    mask = batch["loss_mask"][:, 1:].float()  # (B, T-1)
    nll_sum = -(logp * mask).sum()
    return nll_sum / norm, {"loss_sum": nll_sum.item(), "count": mask.sum().item(), "tokens": attn.sum().item()}


def reward_batch(items: list[tuple[Encoded, Encoded, float]], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows in one padded batch: ids (2B, T)."""
    seqs = [c.input_ids for c, _, _ in items] + [r.input_ids for _, r, _ in items]
    ids, attn = pad_right(seqs, pad_id)
    return {"input_ids": ids, "attention_mask": attn,
            "margin": torch.tensor([m for _, _, m in items], dtype=torch.float32)}


def reward_loss(model, batch: dict[str, torch.Tensor], norm: float, center_coef: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Ranking loss (sum over pairs / norm) plus the centering regulariser."""
    scores = sequence_scores(model, batch["input_ids"], batch["attention_mask"])  # (2B,)
    B = scores.shape[0] // 2
    chosen, rejected = scores[:B], scores[B:]  # (B,), (B,)
    loss_mean, stats = pairwise_ranking_loss(chosen, rejected, batch["margin"], center_coef)
    return loss_mean * B / norm, {"loss_sum": loss_mean.item() * B, "count": B, "correct": stats["accuracy"] * B,
                                  "tokens": batch["attention_mask"].sum().item()}


def reward_count(items) -> int:
    return len(items)


# ---------------------------------------------------------------------------------------
# The Ray Train worker loop
# ---------------------------------------------------------------------------------------

@dataclass
class Task:
    name: str  # "sft" | "reward"
    out_dir: Path  # save_dir/sft or save_dir/reward_model
    model: object
    tokenizer: object
    train: list
    eval: list
    batch: Callable  # items -> batch dict
    loss: Callable  # (model, batch, norm) -> (loss, stats)
    count: Callable  # items -> int
    epochs: int
    batch_size: int
    micro_batch: int
    lr: float
    warmup_ratio: float
    eval_every: int
    higher_is_better: bool  # eval metric direction (accuracy vs loss)


def input_model_dir(cfg: RLHFConfig, stage: str) -> tuple[str, str]:
    """(model dir, why) for a stage: each stage starts from the previous stage's best model when present."""
    sft_best = safe_join(cfg.save_dir, "sft", "best_model")
    if stage == "reward" and is_complete(sft_best):
        warn_if_unfinished(sft_best, "reward")
        return str(sft_best), "the SFT checkpoint"
    return cfg.model_name, "model_name (no SFT checkpoint in save_dir)" if stage == "reward" else "model_name"


def build_task(cfg: RLHFConfig, stage: str, world: int, bf16: bool = False) -> Task:
    save = Path(cfg.save_dir)
    model_dir, why = input_model_dir(cfg, stage)
    tok = load_tokenizer(cfg.tokenizer_path or (model_dir if stage == "reward" and why.startswith("the SFT") else cfg.model_name))
    stats = ReadStats()
    if stage == "sft":
        rows, stats = read_dataset(cfg.sft_data_path, "sft", cfg.bad_rows, cfg.max_bad_fraction)
        items = tokenize_sft(tok, rows, cfg.max_length, cfg.truncate, stats)
        model = load_causal_lm(model_dir, bf16)
        batch_fn = lambda it: sft_batch(it, tok.pad_token_id)
        loss_fn, count_fn = sft_loss, sft_count
        epochs, bs, micro, lr, warm = cfg.sft_epochs, cfg.sft_batch_size, cfg.sft_micro_batch_size, cfg.sft_lr, cfg.sft_warmup_ratio
        out, higher = safe_join(save, "sft"), False
    else:
        rows, stats = read_dataset(cfg.reward_data_path, "preference", cfg.bad_rows, cfg.max_bad_fraction)
        items = tokenize_preferences(tok, rows, cfg.max_length, cfg.truncate, stats)
        model = load_scalar_model(model_dir, bf16, tok.pad_token_id)
        if cfg.freeze_reward_backbone:
            for n, p in model.named_parameters():
                p.requires_grad = n.startswith("score.")
        batch_fn = lambda it: reward_batch(it, tok.pad_token_id)
        loss_fn = lambda m, b, n: reward_loss(m, b, n, cfg.reward_center_coef)
        count_fn = reward_count
        epochs, bs, micro, lr, warm = cfg.reward_epochs, cfg.reward_batch_size, cfg.reward_micro_batch_size, cfg.reward_lr, cfg.reward_warmup_ratio
        out, higher = safe_join(save, "reward_model"), True
    check_special_tokens(tok, model.get_input_embeddings().weight.shape[0])
    log.info("%s: starting from %s (%s); data: %s", stage, model_dir, why, stats.summary())
    train_idx, eval_idx = split_eval(len(items), cfg.eval_fraction, cfg.seed)
    return Task(stage, out, model, tok, [items[i] for i in train_idx], [items[i] for i in eval_idx], batch_fn,
                loss_fn, count_fn, epochs, bs, micro or bs // world, lr, warm, cfg.sft_eval_every if stage == "sft" else 0,
                higher)


def supervised_worker(config: dict) -> None:
    """Ray Train `train_loop_per_worker` for the SFT and reward stages."""
    import ray.train
    import torch.distributed as dist

    from .distributed import all_reduce_sum, enter_workdir, full_state_dict, make_engine, set_threads
    from .tracking import MetricsWriter, setup_logging, truncate_metrics

    enter_workdir(config.pop("_cwd"))
    stage = config.pop("_stage")
    cpus = config.pop("_cpus_per_worker")
    bf16 = use_bf16(config["bf16"], config.pop("_device"))
    cfg = load_config(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    setup_logging(cfg.log_level, Path(cfg.save_dir) / "logs", role=f"{stage}-worker-{rank}")
    set_threads(cpus)
    torch.manual_seed(cfg.seed)
    task = build_task(cfg, stage, world, bf16)
    accum = task.batch_size // (task.micro_batch * world)
    steps_per_epoch = len(task.train) // task.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{stage}: {len(task.train)} training rows, fewer than one batch of {task.batch_size}")
    total = steps_per_epoch * task.epochs
    engine = make_engine(task.model, lr=task.lr, total_steps=total, warmup_steps=int(task.warmup_ratio * total),
                         micro_batch=task.micro_batch, grad_accum=accum, zero_stage=cfg.zero_stage, grad_clip=1.0,
                         bf16=bf16)
    device = engine.device
    to_dev = lambda b: {k: v.to(device) for k, v in b.items()}
    best = None
    step = 0
    t_start = time.time()
    tokens_seen = 0.0
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as d:
            state = load_train_state(engine, Path(d), rank, world)
        step, best, tokens_seen = state["step"], state["best"], state["tokens_seen"]
        log.info("%s: resuming from Ray Train checkpoint %s at step %d of %d", stage, resumed.path, step, total)
        if rank == 0:
            truncate_metrics(task.out_dir / "metrics.jsonl", "step", step)
    first_step, first_tokens = step, tokens_seen  # this attempt's share, for its own tokens/s
    metrics = MetricsWriter(task.out_dir / "metrics.jsonl") if rank == 0 else None

    def evaluate() -> dict[str, float]:
        engine.eval()
        mine = task.eval[rank::world]
        sums = [0.0, 0.0, 0.0]
        with torch.no_grad():
            for i in range(0, len(mine), task.micro_batch):
                _, st = task.loss(engine.module, to_dev(task.batch(mine[i: i + task.micro_batch])), 1.0)
                sums = [sums[0] + st["loss_sum"], sums[1] + st["count"], sums[2] + st.get("correct", 0.0)]
        loss_sum, count, correct = all_reduce_sum(sums)
        engine.train()
        out = {"eval_loss": loss_sum / max(count, 1)}
        if stage == "reward":
            out["eval_accuracy"] = correct / max(count, 1)
        return out

    def maybe_save_best(ev: dict[str, float]) -> bool:
        nonlocal best
        key = "eval_accuracy" if task.higher_is_better else "eval_loss"
        value = ev[key]
        improved = best is None or (value > best if task.higher_is_better else value < best)
        if not improved:
            return False
        best = value
        save_model()
        log.info("%s: new best model (%s %.4f) at step %d", stage, key, value, step)
        return True

    def save_model() -> None:
        state = full_state_dict(engine)  # collective under ZeRO-3
        if rank == 0:
            with atomic_dir(task.out_dir / "best_model") as tmp:
                save_hf(engine.module, task.tokenizer, tmp, state_dict=state)

    if task.eval and resumed is None:
        ev = evaluate()
        if rank == 0:
            metrics.write({"step": 0, "epoch": 0, **ev})
        log.info("%s: before training %s", stage, _fmt(ev))
    engine.train()
    for epoch in range(step // steps_per_epoch, task.epochs):
        order = list(range(len(task.train)))  # the data order is a function of (seed, epoch): resumable
        random.Random(cfg.seed + epoch).shuffle(order)
        for s in range(step % steps_per_epoch if epoch == step // steps_per_epoch else 0, steps_per_epoch):
            global_items = [task.train[i] for i in order[s * task.batch_size:(s + 1) * task.batch_size]]
            norm = task.count(global_items) / (world * accum)  # DeepSpeed averages over ranks and micro-steps
            per_rank = task.batch_size // world
            mine = global_items[rank * per_rank:(rank + 1) * per_rank]
            sums = [0.0, 0.0, 0.0, 0.0]
            t0 = time.time()
            for m in range(accum):
                micro = mine[m * task.micro_batch:(m + 1) * task.micro_batch]
                loss, st = task.loss(engine.module, to_dev(task.batch(micro)), norm)
                engine.backward(loss)
                engine.step()
                sums = [a + b for a, b in zip(sums, (st["loss_sum"], st["count"], st.get("correct", 0.0), st["tokens"]))]
            loss_sum, count, correct, tokens = all_reduce_sum(sums)
            step += 1
            tokens_seen += tokens
            rec = {"step": step, "epoch": epoch + (s + 1) / steps_per_epoch, "loss": loss_sum / max(count, 1),
                   "lr": engine.get_lr()[0], "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                   "tokens_per_s": tokens / max(time.time() - t0, 1e-9),
                   "total_steps": total}
            if stage == "reward":
                rec["accuracy"] = correct / max(count, 1)
            last_of_epoch = s == steps_per_epoch - 1
            if task.eval and ((task.eval_every and step % task.eval_every == 0) or last_of_epoch):
                ev = evaluate()
                rec.update(ev)
                rec["best"] = maybe_save_best(ev)
            if rank == 0:
                metrics.write(rec)
            if step == 1 or step % 10 == 0 or last_of_epoch:
                log.info("%s: step %d/%d %s", stage, step, total, _fmt(rec))
            save_every = cfg.train_save_steps or steps_per_epoch
            if step % save_every == 0 or step == total:
                report_train_state(engine, {"step": step, "best": best, "tokens_seen": tokens_seen, "world": world,
                                            "epoch": epoch + (s + 1) / steps_per_epoch}, rank)
    if not task.eval:  # nothing to select on: the last model is the best we have
        save_model()
    if rank == 0:
        elapsed = time.time() - t_start
        rate = (tokens_seen - first_tokens) / elapsed
        metrics.write({"summary": True, "steps": step, "first_step": first_step, "seconds": elapsed,
                       "tokens_per_s": rate, "best": best})
        metrics.close()
        log.info("%s: done, %d steps (%d in this attempt: %.1fs, %.0f tokens/s), best %s", stage, step,
                 step - first_step, elapsed, rate, best)
    if dist.is_initialized():
        dist.barrier()


def report_train_state(engine, state: dict, rank: int) -> None:
    """Report a Ray Train checkpoint every rank contributes to (a collective): DeepSpeed's weights and
    optimizer shards, this rank's torch RNG state, a sha256 manifest of this rank's files, and (rank 0)
    the loop state. Ray Train merges the ranks' files and registers the checkpoint once all have reported."""
    import ray.train
    from ray.train import CheckpointUploadMode
    from safetensors.torch import save_file

    from .checkpoint import sha256_file

    d = Path(tempfile.mkdtemp(prefix="rlhf-dist-ckpt-"))
    engine.save_checkpoint(str(d), tag="engine", client_state={})
    save_file({"torch": torch.get_rng_state()}, d / f"rng.rank{rank}.safetensors")
    if rank == 0:
        (d / "state.json").write_text(json.dumps(state))
    files = sorted(p for p in d.rglob("*") if p.is_file())
    manifest = {str(p.relative_to(d)): sha256_file(p) for p in files}
    (d / f"manifest.rank{rank}.json").write_text(json.dumps(manifest, indent=1))
    # Asynchronous: a synchronous report waits its turn with the controller (about 1.7 s a call here,
    # measured); the upload runs beside training and the local copy is deleted after it.
    ray.train.report({"step": state["step"], "epoch": state["epoch"]}, checkpoint=ray.train.Checkpoint.from_directory(d),
                     checkpoint_upload_mode=CheckpointUploadMode.ASYNC, delete_local_checkpoint_after_upload=True)


def load_train_state(engine, d: Path, rank: int, world: int) -> dict:
    """Verify every rank's manifest, then load the DeepSpeed state (its loader unpickles, so only files
    whose sha256 matches what this run wrote get to it) and this rank's RNG state."""
    from safetensors.torch import load_file

    from .checkpoint import CheckpointError, sha256_file

    state = json.loads((d / "state.json").read_text())
    if state["world"] != world:
        raise CheckpointError(f"{d} was written by {state['world']} workers, this run has {world}; resume with "
                              f"the same number of workers, or delete {d.parent} to start the stage over")
    for r in range(world):
        m = d / f"manifest.rank{r}.json"
        if not m.is_file():
            raise CheckpointError(f"{d}: incomplete checkpoint, {m.name} is missing")
        for rel, digest in json.loads(m.read_text()).items():
            f = d / rel
            actual = sha256_file(f) if f.is_file() else "missing"
            if actual != digest:
                raise CheckpointError(f"{f}: sha256 mismatch: expected {digest}, got {actual}")
    engine.load_checkpoint(str(d), tag="engine")
    torch.set_rng_state(load_file(d / f"rng.rank{rank}.safetensors")["torch"])
    return state


def _fmt(rec: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()
                    if k not in ("total_steps",))


def run_supervised(cfg: RLHFConfig, stage: str, device: str) -> Path:
    """Run the SFT or reward stage as a Ray Train TorchTrainer job; returns its best_model directory."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    workers = cfg.sft_workers if stage == "sft" else cfg.reward_workers
    use_gpu = device == "cuda"
    cpus = cfg.train_cpus_per_worker
    # Ray Train gives up on a worker group that has not started in 60 s; a loaded machine needs longer.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(int(cfg.setup_timeout_s)))
    # The controller takes one queued report per poll, every 2 s by default: checkpoints reported faster than
    # that piled up, and a tiny SFT stage waited 17 s after its last step for them. Polling is one small remote
    # call per worker.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    config = dict(cfg.to_dict(), _stage=stage, _cpus_per_worker=cpus, _device=device, _cwd=os.getcwd())
    remove_stale_temps(safe_join(cfg.save_dir, "sft" if stage == "sft" else "reward_model"))
    trainer = TorchTrainer(
        supervised_worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus, **({"GPU": cfg.train_gpus_per_worker} if use_gpu else {})}),
        # The same name and storage on a rerun: Ray Train finds the last checkpoint and the loop resumes from it.
        # A dead worker group restarts from it too (max_failures); a group that cannot start is an error.
        run_config=RunConfig(name=stage, storage_path=str(safe_join(cfg.save_dir, "ray_train").resolve()),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=cfg.max_restarts, controller_failure_limit=0)),
    )
    out = safe_join(cfg.save_dir, "sft" if stage == "sft" else "reward_model", "best_model")
    mark_stage_started(out)
    trainer.fit()
    if not is_complete(out):
        raise RuntimeError(f"{stage}: the job finished but {out} is not a complete checkpoint")
    mark_stage_finished(out)
    return out
