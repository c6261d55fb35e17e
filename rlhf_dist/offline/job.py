"""The one Ray Train job skeleton of the offline stages (SFT, reward model, DPO, KTO), with DeepSpeed inside.

`run_supervised` (the driver) starts the job; `supervised_worker` (each worker) builds the stage's `Task`
(`task.py`) and DeepSpeed engine and runs `loop.StageLoop`. A step runs unchanged in one process.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import RLHFConfig, load_config
from ..config.stages import STAGES
from ..io.checkpoint import is_complete, mark_stage_finished, mark_stage_started, remove_stale_temps, safe_join
from ..io.tracking import Timers, setup_logging
from ..models.precision import use_bf16
from ..runtime.distributed import enter_workdir, make_engine, set_threads
from .loop import StageLoop
from .task import build_task, input_model_dir

log = logging.getLogger(__name__)


def supervised_worker(config: dict) -> None:
    """Ray Train `train_loop_per_worker` for the offline stages."""
    import ray.train  # deferred: loading ray takes seconds
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
    total = task.steps_per_epoch * task.epochs
    with startup.phase("deepspeed"):
        engine = make_engine(task.model, lr=task.lr, total_steps=total, warmup_steps=int(task.warmup_ratio * total),
                             micro_batch=task.micro_batch, grad_accum=task.batch_size // (task.micro_batch * world),
                             zero_stage=cfg.zero_stage, grad_clip=1.0, bf16=bf16,
                             offload_optimizer=cfg.offload_optimizer)
    StageLoop(task, engine, cfg, rank, world, startup).run()
    if dist.is_initialized():
        dist.barrier()


def run_supervised(cfg: RLHFConfig, stage: str, device: str) -> Path:
    """Run an offline stage as a Ray Train TorchTrainer job; returns its best_model directory."""
    from ray.train import (  # deferred: loading ray takes seconds
        CheckpointConfig,
        FailureConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchConfig, TorchTrainer  # deferred: loading ray takes seconds

    spec = STAGES[stage]
    workers = getattr(cfg, spec.fields.workers)
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
    remove_stale_temps(safe_join(cfg.save_dir, spec.out_dir))
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
    out = safe_join(cfg.save_dir, spec.out_dir, spec.output)
    mark_stage_started(out)
    trainer.fit()
    if not is_complete(out):
        raise RuntimeError(f"{stage}: the job finished but {out} is not a complete checkpoint")
    mark_stage_finished(out)
    return out
