"""The `rlhf-dist` command."""

from __future__ import annotations

import argparse
import logging
import sys

from ..config import ConfigError, load_config
from ..config.stages import STAGES
from ..data.rows import DataError
from ..demo.tiny import build_tiny
from ..io.checkpoint import CheckpointError
from ..io.report import cli_report
from ..io.tracking import setup_logging
from ..models.load import ModelError
from ..online.health import HealthError
from ..pipeline import create_rlhf_pipeline
from .failures import EXIT, report_failure

USER_ERRORS = (ConfigError, DataError, ModelError, CheckpointError, FileNotFoundError)


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML or JSON run config")
    p.add_argument("overrides", nargs="*", help="key=value overrides, dotted for groups (wandb.mode=offline)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-dist", description="Distributed RLHF: SFT -> reward model -> PPO, "
                                                                   "or SFT -> DPO")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("run", "the config's stages in order (default: SFT -> reward model -> PPO)"),
                        *((s.name, s.help) for s in STAGES.values()),
                        ("check", "validate the config, models, tokenizer, reward_fn and every data source, then exit")):
        _add_config(sub.add_parser(name, help=help_))
    _add_config(sub.add_parser("doctor", help="versions, the Ray cluster and where each PPO role would be placed "
                                              "(loads nothing; exit 3 when something cannot be placed)"))
    p = sub.add_parser("init-tiny", help="build a tiny tokenizer, model and demo data for tests and the quickstart")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("eval", help="evaluate the run's checkpoints on held-out prompts (one process, no Ray)")
    _add_config(p)  # overrides go before the options: --checkpoints takes every word after it
    p.add_argument("--checkpoints", nargs="+", metavar="NAME=DIR",
                   help="default: every complete checkpoint in save_dir")
    p.add_argument("--num-prompts", type=int, default=None, help="evaluate the first N rows only (default: all)")
    p.add_argument("--data", default=None, help="eval rows in an SFT layout (prompt/response, messages, ...) from any "
                                                "source of docs/data.md (default: eval.jsonl beside sft_data_path)")
    p.add_argument("--gold", default=None, metavar="MODULE:FUNCTION",
                   help="rule-based gold metric (default: reward_fn)")
    p = sub.add_parser("report", help="plots and report.md from a run's local metrics files")
    p.add_argument("save_dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    loaded: dict = {}  # _dispatch puts the config's save_dir here: where run.log, and a traceback, go
    try:
        return _dispatch(args, loaded)
    except USER_ERRORS as e:
        if isinstance(e, FileNotFoundError) and not e.filename:
            # No path named: not a file the user gave us, but a bug; its traceback goes to run.log.
            return report_failure(e, args.command, loaded.get("save_dir"))
        # A user's mistake: one clear line, no traceback.
        print(f"rlhf-dist: error: {e}", file=sys.stderr)
        return EXIT["user"]
    except HealthError as e:
        # The run stopped itself (KL limit, non-finite weights, too many bad steps); checkpoints are intact.
        print(f"rlhf-dist: stopped: {e}", file=sys.stderr)
        return EXIT["stopped"]
    except KeyboardInterrupt:
        print("rlhf-dist: interrupted", file=sys.stderr)
        return EXIT["interrupted"]
    except Exception as e:
        # A role died, a timeout, a collective error, a bug: one line here, the traceback in run.log.
        return report_failure(e, args.command, loaded.get("save_dir"))


def _dispatch(args, loaded: dict) -> int:
    if args.command == "doctor":
        cfg = load_config(args.config, args.overrides)
        loaded["save_dir"] = cfg.save_dir
        setup_logging(cfg.log_level)
        from .doctor import doctor  # deferred: it loads the placement and engine code (torch._dynamo, seconds)

        return doctor(cfg)
    if args.command == "init-tiny":
        paths = build_tiny(args.dir, seed=args.seed)
        for k, v in paths.items():
            print(f"{k}: {v}")
        return 0
    if args.command == "eval":
        from ..evaluation.evaluate import cli_eval  # deferred: it loads the model code (torch._dynamo, seconds)

        return cli_eval(args)
    if args.command == "report":
        return cli_report(args)


    pipe = create_rlhf_pipeline(args.config, args.overrides)
    loaded["save_dir"] = pipe.config.save_dir
    if args.command == "check":
        setup_logging(pipe.config.log_level)
        for line in pipe.check():
            print(line)
        print("config and data ok")
        return 0
    run = pipe.run_full_pipeline if args.command == "run" else lambda: pipe.run_stage(args.command)
    try:
        result = run()
    finally:
        pipe.close()
    logging.getLogger("rlhf_dist").info("outputs: %s", result)
    print(result if not isinstance(result, dict) else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
