"""What a stage of the Ray Train job trains: its data, model, batches and loss (`Task`), and its micro-batches.

The steps (`steps.sft.sft_loss`, `steps.reward.reward_loss`, `steps.dpo.dpo_step_loss`, `steps.kto.kto_step_loss`)
are plain functions of a model and a batch; each stage module's `task_parts` (named by the stage's row in
`config.stages`) binds one of them to the stage's data and model, `build_task` adds what every stage shares, and
`loop.StageLoop` runs it.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..config import RLHFConfig
from ..config.stages import STAGES, micro_batch_size
from ..data.encode import Encoded, check_special_tokens, split_eval
from ..io.checkpoint import safe_join
from ..io.sources import check_model_paths, policy_start
from ..io.tracking import Timers
from ..models.load import apply_lora, enable_gradient_checkpointing, load_tokenizer
from ..models.packing import micro_batch_indices, pack

log = logging.getLogger(__name__)

@dataclass
class Task:
    name: str  # an offline stage of config.stages.STAGES
    out_dir: Path  # save_dir / its out_dir
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
    # A mean over a whole step that each micro-batch's loss needs (KTO: the KL estimate of its reference point):
    # a no-grad pass over `step_items(micro)` of every micro-batch of the step (or of the eval set) first;
    # `step_sums(model, batch) -> (sum, count)` summed over those and the ranks; batch["step_mean"] = sum / count.
    step_items: Callable | None = None
    step_sums: Callable | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (a partial last batch is dropped); an error when there is none."""
        n = len(self.train) // self.batch_size
        if n == 0:
            raise ValueError(f"{self.name}: {len(self.train)} training rows, fewer than one batch of {self.batch_size}")
        return n


def input_model_dir(cfg: RLHFConfig, stage: str) -> tuple[str, str]:
    """(model dir, why) for a stage: reward and DPO start from the policy's start (policy_model_path, else
    SFT's best model, its manifest verified first, else model_name). Resolved once, on the driver."""
    if stage == "sft":
        return cfg.model_name, "model_name"
    check_model_paths(cfg)
    return policy_start(cfg, stage)


def build_task(cfg: RLHFConfig, stage: str, world: int, bf16: bool = False, start: tuple[str, str] | None = None,
               timers: Timers | None = None) -> Task:
    """`start`: (model dir, why) as `input_model_dir` gave the driver (resolved here when None). `timers`:
    gets the seconds of its "data" (read, tokenise) and "model" (load) phases."""
    timers = timers or Timers()
    model_dir, why = start or input_model_dir(cfg, stage)
    spec = STAGES[stage]
    with timers.phase("data"):
        tok = load_tokenizer(cfg.tokenizer_path or model_dir)
        items, stats, parts = task_parts_of(spec)(cfg, tok, model_dir, bf16)
    with timers.phase("model"):
        parts["model"] = parts["model"]()
    check_special_tokens(tok, parts["model"].get_input_embeddings().weight.shape[0])
    if cfg.gradient_checkpointing:  # the trained model only (DPO's reference pass runs without grad)

        enable_gradient_checkpointing(parts["model"])
    if cfg.lora_rank:  # the reward model's score head is new, so it trains in full
        parts["model"] = apply_lora(parts["model"], cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                                    cfg.lora_target_modules, ["score"] if stage == "reward" else None)
    log.info("%s: starting from %s (%s); data: %s", stage, model_dir, why, stats.summary())
    train_idx, eval_idx = split_eval(len(items), cfg.eval_fraction, cfg.seed)
    f = spec.fields
    return Task(stage, safe_join(cfg.save_dir, spec.out_dir), tokenizer=tok, train=[items[i] for i in train_idx],
                eval=[items[i] for i in eval_idx], epochs=getattr(cfg, f.epochs), batch_size=getattr(cfg, f.batch),
                micro_batch=micro_batch_size(cfg, spec, world), lr=getattr(cfg, f.lr),
                max_tokens=getattr(cfg, f.max_tokens), warmup_ratio=getattr(cfg, f.warmup), **parts)


def task_parts_of(spec) -> Callable:
    """The stage's `task_parts(cfg, tok, model_dir, bf16) -> (items, ReadStats, Task fields)`, named by its row
    (imported here: the config layer that holds the table imports no stage code)."""
    module, name = spec.task.split(":")
    return getattr(importlib.import_module(module), name)


def micro_batches(task: Task, items: list, agree: Callable[[int], int] = lambda k: k) -> list[list]:
    """This rank's items -> micro-batches: of `task.micro_batch` items, or packed by tokens (`agree`: the
    count every rank reaches, see `packing.plan_micro_batches`)."""
    plan = micro_batch_indices([item_tokens(x) for x in items], task.micro_batch, task.max_tokens, agree)
    return [[items[i] for i in b] for b in plan]


def item_tokens(item) -> int:
    """Tokens of an SFT conversation, of both sides of a reward-model pair, or a record's own count (`tokens`:
    DPO's pair, KTO's row with its mismatched pair)."""
    if isinstance(item, Encoded):
        return len(item.input_ids)
    if isinstance(item, tuple):
        return sum(len(e.input_ids) for e in item[:2])
    return item.tokens


def make_batch(task: Task, items: list, flat: bool, step_mean: torch.Tensor | None = None) -> dict:
    """The task's padded batch, plus its packed layout when the task packs (built on the CPU; `flat`: one
    row, `packing.one_row`), and the step's mean when the task has one (`Task.step_sums`)."""
    batch = task.batch(items)
    if task.max_tokens is not None:
        batch["packed"] = pack(batch["input_ids"], batch["attention_mask"], flat)
    if step_mean is not None:
        batch["step_mean"] = step_mean
    return batch
