"""The one Ray Train job skeleton of the SFT, reward-model and DPO stages, with DeepSpeed inside.

The steps (`sft.sft_loss`, `reward.reward_loss`, `dpo.dpo_step_loss`) are plain functions of a model and a
batch; `supervised_worker` is the Ray Train loop that wraps them with DeepSpeed, sharding and evaluation.
Every loss is normalised by the *global* count of the optimizer step (tokens for SFT, pairs for RM and
DPO), so 1 worker and 2 workers, or micro-batches and gradient accumulation, follow the same trajectory.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..io.checkpoint import atomic_dir, is_complete, mark_stage_finished, mark_stage_started, remove_stale_temps, safe_join
from ..io.sources import check_model_paths, policy_start
from ..io.tracking import Timers
from ..config import RLHFConfig, load_config
from ..data import Encoded, ReadStats, check_special_tokens, read_dataset, split_eval, tokenize_preferences, tokenize_sft
from ..models import apply_lora, load_causal_lm, load_scalar_model, load_tokenizer, save_hf
from ..packing import micro_batch_indices, one_row, pack
from ..precision import use_bf16
from .train_state import load_train_state, report_train_state
from .dpo import DPOPair, attach_reference, dpo_batch, dpo_count, dpo_step_loss
from .reward import reward_batch, reward_count, reward_loss
from .sft import sft_batch, sft_count, sft_loss

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# The Ray Train worker loop
# ---------------------------------------------------------------------------------------

# The subdirectory of save_dir each stage writes (best_model, metrics.jsonl, stage_complete.json).
OUT_DIRS = {"sft": "sft", "reward": "reward_model", "dpo": "dpo"}


@dataclass
class Task:
    name: str  # "sft" | "reward" | "dpo"
    out_dir: Path  # save_dir / OUT_DIRS[name]
    model: object
    tokenizer: object
    train: list
    eval: list
    batch: Callable  # items -> batch dict
    loss: Callable  # (model, batch, norm) -> (loss, stats: sums of loss_sum, count, tokens and `stats`)
    count: Callable  # items -> int
    epochs: int
    batch_size: int
    micro_batch: int
    lr: float
    warmup_ratio: float
    eval_every: int
    higher_is_better: bool  # best_model by eval_accuracy (True) or eval_loss (False)
    stats: tuple[str, ...] = ()  # further sums the loss returns, logged as means per item (and as eval_*)
    prepare: Callable | None = None  # (model, to_dev, items, micro) -> items, once before training (DPO's reference)
    max_tokens: int | None = None  # packed micro-batches of at most this many real tokens; None = padded


def input_model_dir(cfg: RLHFConfig, stage: str) -> tuple[str, str]:
    """(model dir, why) for a stage: reward and DPO start from the policy's start (policy_model_path, else
    SFT's best model, its manifest verified first, else model_name). Resolved once, on the driver."""
    if stage == "sft":
        return cfg.model_name, "model_name"
    check_model_paths(cfg)
    return policy_start(cfg, stage)


def _sft_parts(cfg: RLHFConfig, tok, model_dir: str, bf16: bool) -> tuple[list, ReadStats, dict]:
    rows, stats = read_dataset(cfg.sft_data_path, "sft", cfg.bad_rows, cfg.max_bad_fraction)
    items = tokenize_sft(tok, rows, cfg.max_length, cfg.truncate, stats)
    model = lambda: load_causal_lm(model_dir, bf16, cfg.attn_implementation)  # noqa: E731
    return items, stats, dict(model=model, batch=lambda it: sft_batch(it, tok.pad_token_id),
                              loss=sft_loss, count=sft_count, higher_is_better=False, eval_every=cfg.sft_eval_every)


def _reward_parts(cfg: RLHFConfig, tok, model_dir: str, bf16: bool) -> tuple[list, ReadStats, dict]:
    rows, stats = read_dataset(cfg.reward_data_path, "preference", cfg.bad_rows, cfg.max_bad_fraction)
    items = tokenize_preferences(tok, rows, cfg.max_length, cfg.truncate, stats)

    def model():
        m = load_scalar_model(model_dir, bf16, tok.pad_token_id, cfg.attn_implementation)
        if cfg.freeze_reward_backbone:
            for n, p in m.named_parameters():
                p.requires_grad = n.startswith("score.")
        return m

    return items, stats, dict(model=model, batch=lambda it: reward_batch(it, tok.pad_token_id),
                              loss=lambda m, b, n: reward_loss(m, b, n, cfg.reward_center_coef), count=reward_count,
                              higher_is_better=True, eval_every=0, stats=("accuracy",))


def _dpo_parts(cfg: RLHFConfig, tok, model_dir: str, bf16: bool) -> tuple[list, ReadStats, dict]:
    rows, stats = read_dataset(cfg.dpo_data_path or cfg.reward_data_path, "preference", cfg.bad_rows,
                               cfg.max_bad_fraction)
    items = tokenize_preferences(tok, rows, cfg.max_length, cfg.truncate, stats)
    return items, stats, dict(
        model=lambda: load_causal_lm(model_dir, bf16, cfg.attn_implementation),
        batch=lambda it: dpo_batch(it, tok.pad_token_id),
        loss=lambda m, b, n: dpo_step_loss(m, b, n, cfg.dpo_beta, cfg.dpo_loss), count=dpo_count,
        higher_is_better=True, eval_every=0, stats=("accuracy", "reward_margin", "logp_chosen", "logp_rejected"),
        prepare=lambda m, to_dev, it, micro: attach_reference(m, to_dev, it, tok.pad_token_id, micro,
                                                              cfg.dpo_max_tokens_per_micro_batch,
                                                              one_row(cfg.attn_implementation)))


def build_task(cfg: RLHFConfig, stage: str, world: int, bf16: bool = False, start: tuple[str, str] | None = None,
               timers: Timers | None = None) -> Task:
    """`start`: (model dir, why) as `input_model_dir` gave the driver (resolved here when None). `timers`:
    gets the seconds of its "data" (read, tokenise) and "model" (load) phases."""
    timers = timers or Timers()
    model_dir, why = start or input_model_dir(cfg, stage)
    parts_of = {"sft": _sft_parts, "reward": _reward_parts, "dpo": _dpo_parts}[stage]
    with timers.phase("data"):
        tok = load_tokenizer(cfg.tokenizer_path or model_dir)
        items, stats, parts = parts_of(cfg, tok, model_dir, bf16)
    with timers.phase("model"):
        parts["model"] = parts["model"]()
    check_special_tokens(tok, parts["model"].get_input_embeddings().weight.shape[0])
    if cfg.gradient_checkpointing:  # the trained model only (DPO's reference pass runs without grad)
        from ..models import enable_gradient_checkpointing

        enable_gradient_checkpointing(parts["model"])
    if cfg.lora_rank:  # the reward model's score head is new, so it trains in full
        parts["model"] = apply_lora(parts["model"], cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                                    cfg.lora_target_modules, ["score"] if stage == "reward" else None)
    log.info("%s: starting from %s (%s); data: %s", stage, model_dir, why, stats.summary())
    train_idx, eval_idx = split_eval(len(items), cfg.eval_fraction, cfg.seed)
    hp = lambda name: getattr(cfg, f"{stage}_{name}")  # sft_epochs, reward_lr, dpo_batch_size, ...
    return Task(stage, safe_join(cfg.save_dir, OUT_DIRS[stage]), tokenizer=tok, train=[items[i] for i in train_idx],
                eval=[items[i] for i in eval_idx], epochs=hp("epochs"), batch_size=hp("batch_size"),
                micro_batch=hp("micro_batch_size") or hp("batch_size") // world, lr=hp("lr"),
                max_tokens=hp("max_tokens_per_micro_batch"),
                warmup_ratio=hp("warmup_ratio"), **parts)


def supervised_worker(config: dict) -> None:
    """Ray Train `train_loop_per_worker` for the SFT, reward and DPO stages."""
    import ray.train
    import torch.distributed as dist

    from ..distributed import all_reduce_max, all_reduce_sum, enter_workdir, full_state_dict, make_engine, set_threads
    from ..io.tracking import MetricsWriter, setup_logging, truncate_metrics

    startup = Timers()  # where the time before the first step goes, logged with it
    startup.seconds["worker_group"] = time.time() - config.pop("_t_submit")  # the job's start to this call
    enter_workdir(config.pop("_cwd"))
    stage = config.pop("_stage")
    cpus = config.pop("_cpus_per_worker")
    bf16 = use_bf16(config["bf16"], config.pop("_device"))
    start = tuple(config.pop("_start"))  # verified once by the driver, not by every worker
    cfg = load_config(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    setup_logging(cfg.log_level, Path(cfg.save_dir) / "logs", role=f"{stage}-worker-{rank}")
    set_threads(cpus)
    torch.manual_seed(cfg.seed)
    task = build_task(cfg, stage, world, bf16, start, startup)
    accum = task.batch_size // (task.micro_batch * world)
    steps_per_epoch = len(task.train) // task.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{stage}: {len(task.train)} training rows, fewer than one batch of {task.batch_size}")
    total = steps_per_epoch * task.epochs
    with startup.phase("deepspeed"):
        engine = make_engine(task.model, lr=task.lr, total_steps=total, warmup_steps=int(task.warmup_ratio * total),
                             micro_batch=task.micro_batch, grad_accum=accum, zero_stage=cfg.zero_stage,
                             grad_clip=1.0, bf16=bf16, offload_optimizer=cfg.offload_optimizer)
    device = engine.device
    to_dev = lambda b: {k: v.to(device) for k, v in b.items()}
    keys = ("loss_sum", "count", "tokens", *task.stats)  # summed over micro-batches, then over ranks
    agree = lambda k: int(all_reduce_max([float(k)])[0])  # micro-batches per step: the same on every rank
    flat = one_row(cfg.attn_implementation)  # packed: one row with its boundaries, or rows under a mask
    best = None
    step = 0
    t_start = time.time()
    tokens_seen = 0.0
    with startup.phase("prepare"):
        prepare_items(task, engine, to_dev)  # with the starting weights: before a resume loads the trained ones
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
        sums: dict = {}
        with torch.no_grad():
            # ZeRO-3 forwards are collectives: packed, the ranks agree on a count (padded, ranks whose
            # shares straddle a multiple of the micro-batch would differ by one: noted, not handled).
            for micro in micro_batches(task, mine, agree if cfg.zero_stage == 3 else (lambda k: k)):
                _, st = task.loss(engine.module, to_dev(make_batch(task, micro, flat)), 1.0)
                _add(sums, st)
        engine.train()
        return _means(dict(zip(keys, all_reduce_sum(_read(sums, keys)))), task.stats, "eval_")

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
        with startup.phase("eval"):
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
            norm = task.count(global_items) / world  # DeepSpeed averages the gradients over ranks
            per_rank = task.batch_size // world
            mine = global_items[rank * per_rank:(rank + 1) * per_rank]
            t0 = time.time()
            sums, slots = train_step(task, engine, micro_batches(task, mine, agree), norm, flat, to_dev)
            sums = dict(zip(keys + ("slots",), all_reduce_sum(_read(sums, keys) + [slots])))
            slots = sums.pop("slots")
            step += 1
            if step == first_step + 1:
                startup.seconds["first_step"] = time.time() - t0
                log.info("%s: start-up to the end of the first step %.1fs: %s", stage,
                         sum(startup.seconds.values()), startup.summary())
            tokens_seen += sums["tokens"]
            rec = {"step": step, "epoch": epoch + (s + 1) / steps_per_epoch, **_means(sums, task.stats),
                   "lr": engine.get_lr()[0], "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                   "tokens_per_s": sums["tokens"] / max(time.time() - t0, 1e-9),
                   "padding": 1.0 - sums["tokens"] / max(slots, 1.0), "total_steps": total}
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
                       "tokens_per_s": rate, "best": best, "startup_s": startup.seconds})
        metrics.close()
        log.info("%s: done, %d steps (%d in this attempt: %.1fs, %.0f tokens/s), best %s", stage, step,
                 step - first_step, elapsed, rate, best)
    if dist.is_initialized():
        dist.barrier()


def micro_batches(task: Task, items: list, agree: Callable[[int], int] = lambda k: k) -> list[list]:
    """This rank's items -> micro-batches: of `task.micro_batch` items, or packed by tokens (`agree`: the
    count every rank reaches, see `packing.plan_micro_batches`)."""
    plan = micro_batch_indices([item_tokens(x) for x in items], task.micro_batch, task.max_tokens, agree)
    return [[items[i] for i in b] for b in plan]


def item_tokens(item) -> int:
    """Tokens of an SFT conversation, or of both sides of a preference pair."""
    if isinstance(item, Encoded):
        return len(item.input_ids)
    sides = (item.chosen, item.rejected) if isinstance(item, DPOPair) else item[:2]
    return sum(len(e.input_ids) for e in sides)


def make_batch(task: Task, items: list, flat: bool) -> dict:
    """The task's padded batch, plus its packed layout when the task packs (built on the CPU; `flat`: one
    row, `packing.one_row`)."""
    batch = task.batch(items)
    if task.max_tokens is not None:
        batch["packed"] = pack(batch["input_ids"], batch["attention_mask"], flat)
    return batch


def train_step(task: Task, engine, micros: list[list], norm: float, flat: bool,
               to_dev: Callable) -> tuple[dict, float]:
    """One optimizer step over this rank's micro-batches -> (stat sums, token slots the forwards spent).
    The loss carries its own scale (`norm`), so a step may have any number of micro-batches (`accumulate`)."""
    from ..distributed import accumulate

    sums: dict = {}
    slots = 0
    for i in accumulate(engine, len(micros)):
        batch = make_batch(task, micros[i], flat)
        packed = batch.get("packed")
        slots += (batch["attention_mask"] if packed is None else packed.input_ids).numel()
        loss, st = task.loss(engine.module, to_dev(batch), norm)
        engine.backward(loss, scale_wrt_gas=False)
        _add(sums, st)
    return sums, float(slots)


def prepare_items(task: Task, engine, to_dev: Callable) -> None:
    """Run the task's one-off pass over its train and eval items (DPO: the reference's log-probs)."""
    if task.prepare is None:
        return
    t0 = time.time()
    engine.eval()
    task.train, task.eval = (task.prepare(engine.module, to_dev, items, task.micro_batch)
                             for items in (task.train, task.eval))
    engine.train()
    log.info("%s: prepared %d train and %d eval items in %.1fs", task.name, len(task.train), len(task.eval),
             time.time() - t0)


def _add(sums: dict, st: dict) -> None:
    """Add a micro-batch's stats (0-dim tensors or numbers) to `sums`, without reading them to the host."""
    for k, v in st.items():
        v = v.detach().double() if isinstance(v, torch.Tensor) else float(v)
        sums[k] = sums[k] + v if k in sums else v


def _read(sums: dict, keys: tuple[str, ...]) -> list[float]:
    """The sums of `keys` as floats: one host read for all of them."""
    vals = [torch.as_tensor(sums.get(k, 0.0), dtype=torch.float64).cpu() for k in keys]
    return torch.stack(vals).tolist()


def _means(sums: dict[str, float], stats: tuple[str, ...], prefix: str = "") -> dict[str, float]:
    """Per-item means of the summed step or eval stats: loss, and each of `stats`."""
    n = max(sums["count"], 1)
    return {f"{prefix}loss": sums["loss_sum"] / n, **{f"{prefix}{k}": sums[k] / n for k in stats}}


def _fmt(rec: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()
                    if k not in ("total_steps",))


def run_supervised(cfg: RLHFConfig, stage: str, device: str) -> Path:
    """Run the SFT, reward or DPO stage as a Ray Train TorchTrainer job; returns its best_model directory."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    workers = getattr(cfg, f"{stage}_workers")
    use_gpu = device == "cuda"
    cpus = cfg.train_cpus_per_worker
    # Ray Train gives up on a worker group that has not started in 60 s; a loaded machine needs longer.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(int(cfg.setup_timeout_s)))
    # The controller takes one queued report per poll, every 2 s by default: checkpoints reported faster than
    # that piled up, and a tiny SFT stage waited 17 s after its last step for them. Polling is one small remote
    # call per worker.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    config = dict(cfg.to_dict(), _stage=stage, _cpus_per_worker=cpus, _device=device, _cwd=os.getcwd(),
                  _start=input_model_dir(cfg, stage), _t_submit=time.time())
    remove_stale_temps(safe_join(cfg.save_dir, OUT_DIRS[stage]))
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
    out = safe_join(cfg.save_dir, OUT_DIRS[stage], "best_model")
    mark_stage_started(out)
    trainer.fit()
    if not is_complete(out):
        raise RuntimeError(f"{stage}: the job finished but {out} is not a complete checkpoint")
    mark_stage_finished(out)
    return out
