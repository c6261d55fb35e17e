"""The stage table: one row per stage of `rlhf-dist run`. The CLI, the pipeline, the config checks, placement,
doctor, tracking, the report and eval read their stage names, directories and fields from here.

A new offline stage is a row here, its fields in `schema.py` (and in `stages`' Literal, which reads `STAGES`),
and its module under `offline/` with the `task_parts` the row names.
"""

from __future__ import annotations

from dataclasses import dataclass

from .algorithms import ALGORITHMS


@dataclass(frozen=True)
class StageFields:
    """The config fields a stage reads, spelled out so that a search for a field finds its reader."""

    batch: str
    micro_batch: str
    max_tokens: str  # packed micro-batches of at most this many tokens (then micro_batch must be unset)
    workers: str | None = None  # Ray Train workers; None: the online stage, whose roles are placed instead
    epochs: str | None = None
    lr: str | None = None
    warmup: str | None = None
    step_batch: str | None = None  # the samples of one optimizer step, where not `batch` (online: the mini-batch)


@dataclass(frozen=True)
class ReportSpec:
    """A stage's section of `rlhf-dist report`."""

    title: str  # heading and figure title ("SFT", "Reward model")
    short: str  # prefix of its rows in the summary table ("SFT", "RM")
    metric: str | None = None  # per-step key plotted with its eval_ twin; None: the online stage's own plots
    ylabel: str = ""
    png: str = ""
    best: str = "min"  # "min" | "max": which eval value is the best one
    chance: float | None = None  # a dotted chance line (pairwise accuracy: 0.5)


@dataclass(frozen=True)
class Stage:
    name: str  # the CLI command, the `stages` entry, the W&B prefix, the Ray Train run name
    out_dir: str  # under save_dir: <output>/, metrics.jsonl, stage_complete.json
    output: str  # best_model (rewritten at each better eval) or final_model (written once, at the end)
    data_kind: str  # the row format (data.layouts.PARSERS)
    data_field: str
    fields: StageFields
    help: str  # the CLI command's help
    axis: tuple[str, str]  # (x, y) of its progress display and W&B charts
    report: ReportSpec
    task: str | None = None  # "module:function" giving the Ray Train task's parts; None: the online stage
    data_fallback: str | None = None  # read this field's file when data_field is unset
    given_by: str | None = None  # a *_model_path field that gives this stage's output: `run` skips the stage
    makes_policy: bool = False  # its output is a causal LM that `rlhf-dist eval` compares by default

    @property
    def offline(self) -> bool:
        return self.task is not None


_ONLINE = " or ".join((", ".join(list(ALGORITHMS)[:-1]), list(ALGORITHMS)[-1]))  # "ppo, grpo, rloo or reinforce_pp"
_PAIRS = "accuracy (fraction of pairs, chosen > rejected)"

STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("sft", "sft", "best_model", "sft", "sft_data_path",
          StageFields("sft_batch_size", "sft_micro_batch_size", "sft_max_tokens_per_micro_batch", "sft_workers",
                      "sft_epochs", "sft_lr", "sft_warmup_ratio"),
          "supervised fine-tuning (Ray Train + DeepSpeed)", ("step", "loss"),
          ReportSpec("SFT", "SFT", "loss", "cross-entropy (nats / assistant token)", "sft_loss.png", "min"),
          task="rlhf_dist.offline.sft:task_parts", given_by="policy_model_path", makes_policy=True),
    Stage("reward", "reward_model", "best_model", "preference", "reward_data_path",
          StageFields("reward_batch_size", "reward_micro_batch_size", "reward_max_tokens_per_micro_batch",
                      "reward_workers", "reward_epochs", "reward_lr", "reward_warmup_ratio"),
          "reward-model training on preference pairs", ("step", "accuracy"),
          ReportSpec("Reward model", "RM", "accuracy", _PAIRS, "rm_accuracy.png", "max", 0.5),
          task="rlhf_dist.offline.reward:task_parts", given_by="reward_model_path"),
    Stage("dpo", "dpo", "best_model", "preference", "dpo_data_path",
          StageFields("dpo_batch_size", "dpo_micro_batch_size", "dpo_max_tokens_per_micro_batch", "dpo_workers",
                      "dpo_epochs", "dpo_lr", "dpo_warmup_ratio"),
          "DPO on preference pairs from the SFT model (Ray Train + DeepSpeed)", ("step", "accuracy"),
          ReportSpec("DPO", "DPO", "accuracy", f"implicit-reward {_PAIRS}", "dpo_accuracy.png", "max", 0.5),
          task="rlhf_dist.offline.dpo:task_parts", data_fallback="reward_data_path", makes_policy=True),
    Stage("kto", "kto", "best_model", "kto", "kto_data_path",
          StageFields("kto_batch_size", "kto_micro_batch_size", "kto_max_tokens_per_micro_batch", "kto_workers",
                      "kto_epochs", "kto_lr", "kto_warmup_ratio"),
          "KTO on completions labelled desirable or undesirable, from the SFT model (Ray Train + DeepSpeed)",
          ("step", "accuracy"),
          ReportSpec("KTO", "KTO", "accuracy", "implicit reward on the label's side of z0 (fraction of rows)",
                     "kto_accuracy.png", "max", 0.5),
          task="rlhf_dist.offline.kto:task_parts", makes_policy=True),
    Stage("ppo", "ppo", "final_model", "prompt", "ppo_data_path",
          StageFields("ppo_batch_size", "ppo_micro_batch_size", "ppo_max_tokens_per_micro_batch",
                      step_batch="ppo_mini_batch_size"),
          f"online RL (algorithm: {_ONLINE}) against the reward model and/or reward_fn",
          ("iteration", "reward_mean"), ReportSpec("PPO", "PPO")),
)}
OFFLINE = tuple(s for s in STAGES.values() if s.offline)
ONLINE = next(s for s in STAGES.values() if not s.offline)


def micro_batch_size(cfg, stage: Stage, workers: int) -> int:
    """Per-worker micro-batch: the stage's micro-batch field, else one optimizer step's samples (its batch;
    online, the mini-batch) split over `workers`. The only place this default is computed."""
    f = stage.fields
    return getattr(cfg, f.micro_batch) or getattr(cfg, f.step_batch or f.batch) // workers
