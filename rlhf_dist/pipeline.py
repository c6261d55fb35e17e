"""`RLHFPipeline`: chains the stages (SFT -> reward model -> PPO, or SFT -> DPO) over one save_dir."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

from .config import ConfigError, RLHFConfig, load_config, redact
from .config.rewards import environment_errors
from .config.stages import STAGES
from .data.encode import check_special_tokens, tokenize_rows
from .data.read import scan
from .data.rows import DataError, ReadStats
from .data.sources import DataSpec, data_spec
from .io.checkpoint import CheckpointError, is_complete, stage_finished, write_json_atomic
from .io.sources import check_model_paths, policy_start
from .io.tracking import StageMonitor, Tracker, setup_logging
from .models.precision import check_bf16, recompute_old_logprobs
from .rewards.safety import load_safety_filter

log = logging.getLogger(__name__)

PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # read by Ray Train in the driver


@contextlib.contextmanager
def ray_session(cfg: RLHFConfig):
    """Connect to RAY_ADDRESS / cluster.address, or start a local Ray bound to loopback (and stop it after)."""
    import ray  # deferred: loading ray takes seconds

    if ray.is_initialized():
        yield
        return
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    # Ray workers import rlhf_dist; make sure they find this checkout's package and the log format.
    env = {"env_vars": {"RLHF_DIST_LOG_LEVEL": cfg.log_level}}
    watcher_set_here = False  # the switch below, removed again after the session
    try:
        if address:
            log.info("connecting to Ray cluster at %s", address)
            ray.init(address=address, runtime_env=env, log_to_driver=True)
        else:
            if cfg.cluster.bind_host not in ("127.0.0.1", "localhost"):
                log.warning("cluster.bind_host=%s: Ray's ports are reachable from that network; anyone who can "
                            "reach them can run code on this machine", cfg.cluster.bind_host)
            env["worker_process_setup_hook"] = "rlhf_dist.io.tracking.quiet_local_ray_worker"
            # A preempted node's workers need another node to restart on; on this one node, Ray Train's
            # preemption watcher is only one more process per SFT/RM stage (and an error line, ray#53727).
            if PREEMPTION_WATCHER not in os.environ:
                os.environ[PREEMPTION_WATCHER] = "0"
                watcher_set_here = True
            ray.init(num_cpus=cfg.cluster.num_cpus, num_gpus=cfg.cluster.num_gpus, include_dashboard=False,
                     _node_ip_address=cfg.cluster.bind_host, runtime_env=env, log_to_driver=True,
                     configure_logging=False)
            log.info("started a local Ray (bound to %s) with %s", cfg.cluster.bind_host, ray.cluster_resources())
        yield
    finally:
        ray.shutdown()
        if watcher_set_here:
            os.environ.pop(PREEMPTION_WATCHER, None)


class RLHFPipeline:
    """The user-facing API. Every stage reads and writes the standard layout under `save_dir`."""

    def __init__(self, config: RLHFConfig):
        self.config = config
        self.save_dir = Path(config.save_dir)
        self.tracker = None

    # ------------------------------------------------------------------------------
    def _start(self, stages: tuple[str, ...]) -> None:
        self.save_dir.mkdir(parents=True, exist_ok=True)
        setup_logging(self.config.log_level, self.save_dir / "logs")
        write_json_atomic(self.save_dir / "config.json", redact(self.config.to_dict()))
        check_model_paths(self.config)
        self.validate_data(stages)

    def _device(self) -> str:
        """The training device, judged by the Ray cluster's GPUs (call inside ray_session)."""
        import ray  # deferred: loading ray takes seconds

        from .models.load import resolve_device  # deferred: loading torch takes seconds
        cfg = self.config
        device = resolve_device(cfg.device, ray.cluster_resources().get("GPU", 0))
        bf16 = check_bf16(cfg.bf16, device)
        # Fails before SFT where PPO could never start; PPO settles it from where its roles land.
        recompute_old_logprobs(cfg.ppo_recompute_old_logprobs, bf16, bf16, cfg.ppo_overlap_rollout)
        return device

    def _preflight(self, stages: tuple[str, ...]) -> str:
        """The device, once the stages' workers are known to fit the cluster (call inside ray_session).

        A plan that can never be placed, or ranks that NCCL would find on one GPU, raise PlacementError
        here in seconds, naming the role and the resource, instead of a placement wait of setup_timeout_s.
        """
        from .roles.placement import check_cluster  # deferred: loading torch takes seconds

        device = self._device()
        check_cluster(self.config, stages, device)
        return device

    def data_sources(self, stages: tuple[str, ...]) -> list[tuple[DataSpec, str]]:
        """(source, row kind) of every data field the stages read; a stage whose own field is unset reads its
        fallback's (DPO reads reward_data_path unless dpo_data_path is set)."""
        cfg, out = self.config, []
        for stage in map(STAGES.get, stages):
            field = stage.data_field
            if stage.data_fallback and not getattr(cfg, field):
                field = stage.data_fallback
            if not getattr(cfg, field):
                named = f"{stage.data_field} (or {field})" if field != stage.data_field else field
                raise DataError(f"{named}: required by the {stage.name} stage")
            out.append((data_spec(cfg, field, stage.data_kind), stage.data_kind))
        return out

    def validate_data(self, stages: tuple[str, ...], tok=None) -> list[str]:
        """Read every data source the stages need, one row at a time, before any model or Ray worker starts;
        with `tok`, tokenise each row as its stage will (a row over max_length fails unless truncate). Returns
        one line per source (field, path, layout, counts) and one per bad row shown."""
        cfg, lines = self.config, []
        for spec, kind in self.data_sources(stages):
            t, stats = time.time(), ReadStats()
            limit = cfg.max_length - cfg.gen_max_new_tokens if kind == "prompt" else cfg.max_length
            keep = None if tok is None else lambda key, ex: tokenize_rows(tok, kind, [ex], limit, cfg.truncate, stats)
            scan(spec, kind, cfg.bad_rows, cfg.max_bad_fraction, keep, stats)
            lines.append(f"{spec.field}: {spec.path}: {stats.layout} layout, {stats.summary()}")
            lines += [f"  bad row skipped: {e}" for e in stats.skipped_examples]
            log.info("data %s (%.2fs)", lines[-1 - len(stats.skipped_examples)], time.time() - t)
        if cfg.safety_filter and any(not STAGES[s].offline for s in stages):  # a bad rule fails here, naming its line

            load_safety_filter(cfg.safety_filter)
        return lines

    def check(self) -> list[str]:
        """`rlhf-dist check`: the models and the tokenizer can be found and loaded, reward_fn imports, and every
        data source the run reads parses and tokenises within max_length. Returns the lines to print; raises
        ConfigError, ModelError or DataError in one line naming the field."""
        cfg = self.config
        check_model_paths(cfg)
        errors = environment_errors(cfg)  # each source's own check: reward_fn imports, reward_url's env:NAME is set
        if errors:
            raise ConfigError("; ".join(errors))
        tok = check_tokenizer(cfg)
        # The stages `run` runs, and a stage's own file where one is set for a stage that falls back on another's.
        own = tuple(s.name for s in STAGES.values() if s.data_fallback and getattr(cfg, s.data_field))
        return self.validate_data(tuple(dict.fromkeys(cfg.run_stages() + own)), tok)

    # ------------------------------------------------------------------------------
    def run_stage(self, stage: str) -> Path:
        """One stage of config.stages.STAGES on its own; returns its output directory."""
        self._start((stage,))
        with ray_session(self.config):
            device = self._preflight((stage,))
            return self._timed(stage, self._runner(stage, device))

    def _runner(self, stage: str, device: str):
        """The stage's job: a Ray Train job for an offline stage, the online driver for PPO."""
        if STAGES[stage].offline:
            from .offline.job import run_supervised  # deferred: loading torch takes seconds

            return lambda: run_supervised(self.config, stage, device)
        from .online.driver import run_ppo  # deferred: loading torch takes seconds

        return lambda: run_ppo(self.config, device)

    def run_sft(self) -> Path:
        return self.run_stage("sft")

    def run_reward_training(self) -> Path:
        return self.run_stage("reward")

    def run_dpo(self) -> Path:
        """DPO on the preference pairs, from SFT's best model (or model_name); returns dpo/best_model."""
        return self.run_stage("dpo")

    def run_ppo_training(self) -> Path:
        return self.run_stage("ppo")

    def run_full_pipeline(self) -> dict[str, Path]:
        """The config's `stages` in order (default SFT -> RM -> PPO). A stage whose output is already complete
        is not run again."""
        cfg = self.config
        stages = cfg.run_stages()  # less the stages whose output a *_model_path gives
        self._start(stages)
        for stage, field in cfg.given_stages().items():
            log.info("%s: not run, %s gives its output (%s)", stage, field, getattr(cfg, field))
        out: dict[str, Path] = {}
        with ray_session(cfg):
            device = self._preflight(tuple(s for s in stages if not self._finished(s)))
            for stage in stages:
                done = self.stage_output(stage)
                if self._finished(stage):
                    log.info("%s: already complete at %s, not rerun", stage, done)
                    out[stage] = done
                    continue
                out[stage] = self._timed(stage, self._runner(stage, device))
        return out

    def evaluate_model(self, checkpoints: dict[str, str] | None = None, num_prompts: int | None = None, *,
                       data_path: str | None = None, gold: str | None = None, batch_size: int = 32) -> dict:
        """`rlhf-dist eval` on this pipeline's config: compare `checkpoints` ({name: model dir}; default: the
        run's own) and write save_dir/eval/. See rlhf_dist.evaluation.evaluate.evaluate_model."""
        from .evaluation.evaluate import evaluate_model  # deferred: loading torch takes seconds

        return evaluate_model(self.config, checkpoints, num_prompts, data_path=data_path, gold=gold,
                              batch_size=batch_size)

    def _finished(self, stage: str) -> bool:
        # PPO writes final_model only at its end; SFT, RM and DPO rewrite best_model as they go.
        done = self.stage_output(stage)
        return stage_finished(done) if STAGES[stage].offline else is_complete(done)

    def stage_output(self, stage: str) -> Path:
        return self.save_dir / STAGES[stage].out_dir / STAGES[stage].output

    def _timed(self, stage, fn):
        """Run a stage with its progress display and W&B logging (both follow its metrics file)."""
        if self.tracker is None:
            self.tracker = Tracker(self.config, self.save_dir)
        sub = STAGES[stage].out_dir
        total = self.config.ppo_iterations if stage == "ppo" else None
        samples = self.save_dir / "ppo" / "samples.jsonl" if stage == "ppo" else None
        t = time.time()
        log.info("stage %s: start", stage)
        with StageMonitor(stage, self.save_dir / sub / "metrics.jsonl", self.tracker, total, samples):
            result = fn()
        log.info("stage %s: done in %.1fs -> %s", stage, time.time() - t, result)
        return result

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.finish()
            self.tracker = None


def check_tokenizer(cfg: RLHFConfig):
    """The policy's tokenizer, loaded as the stages load it, with its special tokens checked; a failure is one
    line naming the field it came from."""
    from .models.load import ModelError, load_tokenizer  # here, not at the top: models imports torch

    path, field = (cfg.tokenizer_path, "tokenizer_path") if cfg.tokenizer_path else policy_start(cfg, "check")
    try:
        tok = load_tokenizer(path)
    except Exception as e:  # transformers raises OSError, ValueError, ... for one unreadable tokenizer
        first = (str(e).strip().splitlines() or [""])[0]
        raise ModelError(f"{field}: cannot load a tokenizer from {path}: {type(e).__name__}: {first}") from None
    check_special_tokens(tok)
    return tok


def create_rlhf_pipeline(config: "dict | str | os.PathLike | RLHFConfig", overrides: list[str] | None = None) -> RLHFPipeline:
    """Build a pipeline from a dict, a YAML/JSON path or a config (plus optional key=value overrides)."""
    return RLHFPipeline(load_config(config, overrides))


__all__ = ["RLHFPipeline", "create_rlhf_pipeline", "ray_session", "CheckpointError"]
