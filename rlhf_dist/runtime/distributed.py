"""DeepSpeed engines and torch.distributed helpers shared by the SFT, reward and PPO learners.

This is plumbing only: it wraps the training steps (in `offline/`, `steps/update.py`), which run unchanged
in one process without it.
"""

from __future__ import annotations

import logging
import math
import os

import torch
import torch.distributed as dist

from ..models.load import hf_state_dict

log = logging.getLogger(__name__)


def enter_workdir(path: str) -> None:
    """Run in the driver's working directory, so relative paths in the config mean the same in every
    process. (Under `ray job submit`, every process already starts in the shipped working_dir.)"""
    if path and os.path.isdir(path):
        os.chdir(path)


def set_threads(num_cpus: float) -> int:
    """Give this process as many torch threads as CPUs it was allotted, so actors don't oversubscribe."""
    n = max(1, int(round(num_cpus)))
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    return n


def ds_config(*, micro_batch: int, grad_accum: int, world_size: int, zero_stage: int, grad_clip: float,
              bf16: bool, offload_optimizer: bool = False) -> dict:
    """DeepSpeed config (https://www.deepspeed.ai/docs/config-json/); the optimizer is a torch one we pass in.

    offload_optimizer: ZeRO-Offload of the optimizer states and step to CPU memory (zero_stage >= 1). DeepSpeed
    refuses a client optimizer with it unless zero_force_ds_cpu_optimizer is false: the step then stays our
    torch AdamW (fused, on the CPU's fp32 partitions) instead of DeepSpeedCPUAdam, whose op compiles first."""
    zero: dict = {"stage": zero_stage, "stage3_gather_16bit_weights_on_model_save": True}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if offload_optimizer:
        if zero_stage == 0:
            raise ValueError("offload_optimizer: true needs zero_stage >= 1, but zero_stage is 0")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def cosine_with_warmup(total_steps: int, warmup_steps: int):
    """LR multiplier: linear warmup, then cosine decay to 10% (as in most SFT recipes)."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def make_engine(model, *, lr: float, total_steps: int, warmup_steps: int, micro_batch: int, grad_accum: int,
                zero_stage: int, grad_clip: float, bf16: bool, params=None, constant_lr: bool = False,
                offload_optimizer: bool = False):
    """A DeepSpeed engine over `model` (the default process group is its data-parallel group);
    `offload_optimizer`: ZeRO-Offload of the optimizer to CPU memory (`ds_config`)."""
    import deepspeed  # deferred: loading deepspeed takes seconds

    world = dist.get_world_size() if dist.is_initialized() else 1
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    # fused: one kernel for all parameters; 5.9 against 20 ms per step for the benchmark model's
    # parameters on one CPU thread (docs/benchmarks.md).
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    schedule = (lambda step: 1.0) if constant_lr else cosine_with_warmup(total_steps, warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    config = ds_config(micro_batch=micro_batch, grad_accum=grad_accum, world_size=world, zero_stage=zero_stage,
                       grad_clip=grad_clip, bf16=bf16, offload_optimizer=offload_optimizer)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    if world == 1 and zero_stage == 0 and not bf16:
        # One rank has nothing to all-reduce, yet ZeRO-0's backward still copies every gradient into a
        # flat bucket and back: 6 ms of a 0.27 s policy micro-step on the benchmark model (docs/benchmarks.md).
        # Not under ZeRO-1/2, whose reduce step fills the optimizer's own buffers, nor bf16 (not measured).
        engine.enable_backward_allreduce = False
    return engine


def accumulate(engine, n: int):
    """Yield 0..n-1 for the n micro-batches of one optimizer step, after setting DeepSpeed's accumulation
    boundary for each (the last one is it), so a step may have any number of micro-batches (packed steps
    do). The caller runs each micro-batch's forward and `engine.backward(loss, scale_wrt_gas=False)`, its
    loss already carrying its share of the step; this then calls `engine.step()`, which applies the update
    at the boundary."""
    for i in range(n):
        engine.set_gradient_accumulation_boundary(i == n - 1)
        # What engine.forward does before a forward, which the steps bypass (they call the module, or its
        # decoder and head, directly). Without it ZeRO-3 never advances its micro-step id, so each backward
        # overwrote the gradient partitions instead of adding to them: only the last micro-batch counted.
        if hasattr(engine.optimizer, "clear_backward_seen_flag"):
            engine.optimizer.clear_backward_seen_flag()
        yield i
        engine.step()


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """Full weights of the engine's module as its plain HF model names them (LoRA: adapters merged); a
    collective under ZeRO-3 (every rank must call it)."""
    if engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return {k: v.detach().cpu() for k, v in hf_state_dict(engine.module).items()}


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum over the default group's ranks. NCCL reduces only CUDA tensors, gloo CPU ones."""
    return _all_reduce(values, dist.ReduceOp.SUM)


def all_reduce_max(values: list[float]) -> list[float]:
    """Elementwise maximum over the default group's ranks."""
    return _all_reduce(values, dist.ReduceOp.MAX)


def _all_reduce(values: list[float], op) -> list[float]:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def init_local_group_env(rank: int, world: int, master_addr: str, master_port: int, local_rank: int = 0) -> None:
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
