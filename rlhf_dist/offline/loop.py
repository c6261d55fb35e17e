"""One rank's loop of the SFT, reward-model, DPO and KTO jobs over its DeepSpeed engine: optimizer steps,
evaluation, best-model saves, Ray Train checkpoints and resume.

Every loss is normalised by the *global* count of the optimizer step (tokens for SFT, pairs for RM and
DPO), so 1 worker and 2 workers, or micro-batches and gradient accumulation, follow the same trajectory.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Callable

import torch

from ..config import RLHFConfig
from ..io.checkpoint import atomic_dir
from ..io.tracking import MetricsWriter, Timers, truncate_metrics
from ..models.load import save_hf
from ..models.packing import one_row
from ..runtime.distributed import accumulate, all_reduce_max, all_reduce_sum, full_state_dict
from .task import Task, make_batch, micro_batches
from .train_state import load_train_state, report_train_state

log = logging.getLogger(__name__)


class StageLoop:
    """Trains `task` on `engine` as rank `rank` of `world` (the default process group); `startup` has the
    seconds before the loop, to which it adds the first step's."""

    def __init__(self, task: Task, engine, cfg: RLHFConfig, rank: int, world: int, startup: Timers):
        self.task, self.engine, self.cfg, self.rank, self.world, self.startup = task, engine, cfg, rank, world, startup
        self.keys = ("loss_sum", "count", "tokens", *task.stats)  # summed over micro-batches, then over ranks
        self.flat = one_row(cfg.attn_implementation)  # packed: one row with its boundaries, or rows under a mask
        self.agree = lambda k: int(all_reduce_max([float(k)])[0])  # a count every rank reaches: the largest
        self.total = task.steps_per_epoch * task.epochs
        self.step, self.best, self.tokens_seen = 0, None, 0.0
        self.metrics: MetricsWriter | None = None

    def to_dev(self, batch: dict) -> dict:
        return {k: v.to(self.engine.device) for k, v in batch.items()}

    def run(self) -> None:
        """Prepare, resume or evaluate the starting weights, train the remaining steps, write the summary."""
        import ray.train  # deferred: loading ray takes seconds

        task, rank = self.task, self.rank
        t_start = time.time()
        with self.startup.phase("prepare"):
            prepare_items(task, self.engine, self.to_dev)  # with the starting weights: before a resume loads the trained ones
        resumed = ray.train.get_checkpoint()
        if resumed is not None:
            self.resume(resumed)
        first_step, first_tokens = self.step, self.tokens_seen  # this attempt's share, for its own tokens/s
        self.metrics = MetricsWriter(task.out_dir / "metrics.jsonl") if rank == 0 else None
        if task.eval and resumed is None:
            with self.startup.phase("eval"):
                ev = self.evaluate()
            if self.metrics is not None:
                self.metrics.write({"step": 0, "epoch": 0, **ev})
            log.info("%s: before training %s", task.name, _fmt(ev))
        self.engine.train()
        self.train(first_step)
        if not task.eval:  # nothing to select on: the last model is the best we have
            self.save_model()
        if self.metrics is not None:
            elapsed = time.time() - t_start
            rate = (self.tokens_seen - first_tokens) / elapsed
            self.metrics.write({"summary": True, "steps": self.step, "first_step": first_step, "seconds": elapsed,
                                "tokens_per_s": rate, "best": self.best, "startup_s": self.startup.seconds})
            self.metrics.close()
            log.info("%s: done, %d steps (%d in this attempt: %.1fs, %.0f tokens/s), best %s", task.name,
                     self.step, self.step - first_step, elapsed, rate, self.best)

    def resume(self, checkpoint) -> None:
        """Load a Ray Train checkpoint of this run: the engine's state, RNG and loop state."""
        with checkpoint.as_directory() as d:
            state = load_train_state(self.engine, Path(d), self.rank, self.world)
        self.step, self.best, self.tokens_seen = state["step"], state["best"], state["tokens_seen"]
        log.info("%s: resuming from Ray Train checkpoint %s at step %d of %d", self.task.name, checkpoint.path,
                 self.step, self.total)
        if self.rank == 0:
            truncate_metrics(self.task.out_dir / "metrics.jsonl", "step", self.step)

    def train(self, first_step: int) -> None:
        """The remaining epochs' steps. The data order is a function of (seed, epoch): resumable."""
        task = self.task
        per_epoch = task.steps_per_epoch
        for epoch in range(self.step // per_epoch, task.epochs):
            order = list(range(len(task.train)))
            random.Random(self.cfg.seed + epoch).shuffle(order)
            for s in range(self.step % per_epoch if epoch == self.step // per_epoch else 0, per_epoch):
                items = [task.train[i] for i in order[s * task.batch_size:(s + 1) * task.batch_size]]
                self.step_and_record(items, epoch, s, first_step)

    def step_and_record(self, global_items: list, epoch: int, s: int, first_step: int) -> None:
        """One optimizer step over this rank's share of `global_items`, then its metrics row, evaluation
        and checkpoint when due."""
        task, per_epoch = self.task, self.task.steps_per_epoch
        norm = task.count(global_items) / self.world  # DeepSpeed averages the gradients over ranks
        per_rank = task.batch_size // self.world
        mine = global_items[self.rank * per_rank:(self.rank + 1) * per_rank]
        t0 = time.time()
        sums, slots = train_step(task, self.engine, micro_batches(task, mine, self.agree), norm, self.flat,
                                 self.to_dev)
        sums = dict(zip(self.keys + ("slots",), all_reduce_sum(_read(sums, self.keys) + [slots])))
        slots = sums.pop("slots")
        self.step += 1
        if self.step == first_step + 1:
            self.startup.seconds["first_step"] = time.time() - t0
            log.info("%s: start-up to the end of the first step %.1fs: %s", task.name,
                     sum(self.startup.seconds.values()), self.startup.summary())
        self.tokens_seen += sums["tokens"]
        epoch_f = epoch + (s + 1) / per_epoch
        rec = {"step": self.step, "epoch": epoch_f, **_means(sums, task.stats), "lr": self.engine.get_lr()[0],
               "grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
               "tokens_per_s": sums["tokens"] / max(time.time() - t0, 1e-9),
               "padding": 1.0 - sums["tokens"] / max(slots, 1.0), "total_steps": self.total}
        last_of_epoch = s == per_epoch - 1
        if task.eval and ((task.eval_every and self.step % task.eval_every == 0) or last_of_epoch):
            ev = self.evaluate()
            rec.update(ev)
            rec["best"] = self.maybe_save_best(ev)
        if self.metrics is not None:
            self.metrics.write(rec)
        if self.step == 1 or self.step % 10 == 0 or last_of_epoch:
            log.info("%s: step %d/%d %s", task.name, self.step, self.total, _fmt(rec))
        if self.step % (self.cfg.train_save_steps or per_epoch) == 0 or self.step == self.total:
            report_train_state(self.engine, {"step": self.step, "best": self.best, "tokens_seen": self.tokens_seen,
                                             "world": self.world, "epoch": epoch_f}, self.rank)

    def evaluate(self) -> dict[str, float]:
        """Eval loss and stats of this rank's share of the eval set, summed over the ranks. Under ZeRO-3
        every forward gathers the parameters, a collective every rank must join: a rank with fewer
        micro-batches than another (shares differ by one item) runs filler forwards, their stats dropped."""
        task, engine = self.task, self.engine
        engine.eval()
        micros = micro_batches(task, task.eval[self.rank::self.world])
        filler = self.agree(len(micros)) - len(micros) if self.cfg.zero_stage == 3 and self.world > 1 else 0
        sums: dict = {}
        everyone = micros + [task.eval[:1]] * filler
        mean = step_mean(task, engine.module, everyone, self.flat, self.to_dev, len(micros))
        with torch.no_grad():
            for i, micro in enumerate(everyone):
                _, st = task.loss(engine.module, self.to_dev(make_batch(task, micro, self.flat, mean)), 1.0)
                if i < len(micros):
                    _add(sums, st)
        engine.train()
        return _means(dict(zip(self.keys, all_reduce_sum(_read(sums, self.keys)))), task.stats, "eval_")

    def maybe_save_best(self, ev: dict[str, float]) -> bool:
        key = "eval_accuracy" if self.task.higher_is_better else "eval_loss"
        value = ev[key]
        improved = self.best is None or (value > self.best if self.task.higher_is_better else value < self.best)
        if not improved:
            return False
        self.best = value
        self.save_model()
        log.info("%s: new best model (%s %.4f) at step %d", self.task.name, key, value, self.step)
        return True

    def save_model(self) -> None:
        state = full_state_dict(self.engine)  # collective under ZeRO-3
        if self.rank == 0:
            with atomic_dir(self.task.out_dir / "best_model") as tmp:
                save_hf(self.engine.module, self.task.tokenizer, tmp, state_dict=state)


def train_step(task: Task, engine, micros: list[list], norm: float, flat: bool,
               to_dev: Callable) -> tuple[dict, float]:
    """One optimizer step over this rank's micro-batches -> (stat sums, token slots the forwards spent).
    The loss carries its own scale (`norm`), so a step may have any number of micro-batches (`accumulate`)."""
    sums: dict = {}
    slots = 0
    mean = step_mean(task, engine.module, micros, flat, to_dev)
    for i in accumulate(engine, len(micros)):
        batch = make_batch(task, micros[i], flat, mean)
        packed = batch.get("packed")
        slots += (batch["attention_mask"] if packed is None else packed.input_ids).numel()
        loss, st = task.loss(engine.module, to_dev(batch), norm)
        engine.backward(loss, scale_wrt_gas=False)
        _add(sums, st)
    return sums, float(slots)


def step_mean(task: Task, model, micros: list[list], flat: bool, to_dev: Callable,
              real: int | None = None) -> torch.Tensor | None:
    """The task's mean over a whole step (or the eval set), for every micro-batch's loss (`Task.step_sums`):
    a no-grad pass over `micros` (the first `real` count; the rest are ZeRO-3 fillers, run for the collective),
    summed over the ranks. None for a task without one."""
    if task.step_sums is None:
        return None
    total, count = 0.0, 0.0
    for i, micro in enumerate(micros):
        s, n = task.step_sums(model, to_dev(make_batch(task, task.step_items(micro), flat)))
        if real is None or i < real:
            total, count = total + s.detach().double(), count + n
    total, count = all_reduce_sum(_read({"sum": total, "count": count}, ("sum", "count")))
    return torch.tensor(total / max(count, 1.0), dtype=torch.float32)


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
