"""`rlhf-dist report SAVE_DIR`: training curves and a summary, from the run's local metrics files only.

Reads every stage's metrics.jsonl (the stages and their sections: config/stages.py; no W&B, no network,
works on a finished or a crashed run) and writes PNGs plus report.md to SAVE_DIR/report/. A missing stage or metric is
skipped with a line in report.md, never an error.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from ..config.stages import STAGES, Stage
from .tracking import read_metrics, setup_logging

log = logging.getLogger(__name__)

FIGSIZE = (7, 4)
DPI = 110
LW = 1.8


def _read(path: Path, notes: list[str]) -> tuple[list[dict], list[dict]]:
    """-> (curve rows, summary rows). A torn last line (a crash mid-write) is skipped, not fatal."""
    try:
        rows = read_metrics(path)
    except json.JSONDecodeError:
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                notes.append(f"`{path.name}` line {i} is not valid JSON; skipped")
    rows = [r for r in rows if isinstance(r, dict)]
    return [r for r in rows if not r.get("summary")], [r for r in rows if r.get("summary")]


def _series(rows: list[dict], x: str, y: str) -> tuple[list[float], list[float]]:
    """(x, y) over the rows that have a finite y (eval metrics appear only on some rows)."""
    xs, ys = [], []
    for r in rows:
        v, k = r.get(y), r.get(x)
        if isinstance(v, (int, float)) and isinstance(k, (int, float)) and math.isfinite(v):
            xs.append(k)
            ys.append(v)
    return xs, ys


def _smooth(ys: list[float], w: int) -> list[float]:
    """Centred rolling mean (window w, shrinking at the ends): smooths without shifting the curve."""
    h = w // 2
    return [sum(ys[max(0, i - h): i + h + 1]) / len(ys[max(0, i - h): i + h + 1]) for i in range(len(ys))]


def _new(title: str, xlabel: str, ylabel: str):
    import matplotlib.pyplot as plt  # deferred: loading matplotlib takes seconds

    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    _style(ax, title, xlabel, ylabel)
    return fig, ax


def _style(ax, title: str, xlabel: str, ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator  # deferred: loading matplotlib takes seconds

    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and iterations are counts


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt  # deferred: loading matplotlib takes seconds

    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _train_line(ax, xs, ys, label: str, color: str) -> None:
    """Noisy per-batch values: the raw curve faint, a rolling mean on top once there are many points."""
    if len(ys) >= 50:
        w = max(5, len(ys) // 25) | 1  # odd, so the window is centred
        ax.plot(xs, ys, color=color, lw=1.0, alpha=0.3, label=f"{label} (per step)")
        ax.plot(xs, _smooth(ys, w), color=color, lw=LW, label=f"{label} (mean of {w} steps)")
    else:
        ax.plot(xs, ys, color=color, lw=LW, marker="." if len(ys) < 50 else None, label=label)


def _train_and_eval(rows, key: str, title: str, ylabel: str):
    """A figure of a stage's per-step `key` and its eval_`key` -> (fig, ax, steps, train values, eval values), or None
    when the metrics hold neither."""
    xs, ys = _series(rows, "step", key)
    ex, ey = _series(rows, "step", f"eval_{key}")
    if not ys and not ey:
        return None
    fig, ax = _new(title, "optimizer step", ylabel)
    if ys:
        _train_line(ax, xs, ys, f"train {key}", "tab:blue")
    if ey:
        ax.plot(ex, ey, color="tab:orange", lw=LW, ls="--", marker="o", ms=6, label=f"eval {key}")
    return fig, ax, xs, ys, ey


def _plot_offline(stage: Stage, rows, out: Path, md: list[str]) -> dict[str, Any]:
    """An offline stage's section, from its row's ReportSpec: train and eval `metric` per step -> summary rows."""
    spec = stage.report
    made = _train_and_eval(rows, spec.metric, f"{spec.title} {spec.metric}", spec.ylabel)
    if made is None:
        md.append(f"- {spec.title}: no {spec.metric} values in {stage.out_dir}/metrics.jsonl; plot skipped.")
        return {}
    fig, ax, xs, ys, ey = made
    if spec.chance is not None:
        ax.axhline(spec.chance, color="gray", lw=1.0, ls=":", label=f"chance ({spec.chance:g})")
        ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="lower right" if spec.chance is not None else "best")
    _save(fig, out / spec.png)
    md += [f"### {spec.title}", "", f"![{spec.title} {spec.metric}]({spec.png})", ""]
    best = min if spec.best == "min" else max
    _, losses = _series(rows, "step", "loss")
    name = f"{spec.short} {{}} {spec.metric} ({{}})"
    return {name.format("train", "last"): ys[-1] if ys else None, name.format("eval", "last"): ey[-1] if ey else None,
            name.format("eval", "best"): best(ey) if ey else None,
            f"{spec.short} train loss (last)": losses[-1] if losses else None,
            f"{spec.short} steps": xs[-1] if xs else None}


_PPO_X, _PPO_XLABEL = "iteration", "PPO iteration"  # PPO rows are per iteration, not per optimizer step


def _ppo_reward_plot(rows, xs, mean, out: Path) -> str:
    """Reward mean per iteration, ± 1 batch std when logged, and the held-out reward; -> the markdown image."""
    std = dict(zip(*_series(rows, _PPO_X, "reward_std")))
    fig, ax = _new("PPO reward", _PPO_XLABEL, "reward (score per response)")
    ax.plot(xs, mean, color="tab:green", lw=LW, marker="." if len(xs) < 50 else None, label="reward mean")
    if std:
        lo = [m - std.get(x, 0.0) for x, m in zip(xs, mean)]
        hi = [m + std.get(x, 0.0) for x, m in zip(xs, mean)]
        ax.fill_between(xs, lo, hi, color="tab:green", alpha=0.2, label="± 1 std (across the batch)")
    ex, ey = _series(rows, _PPO_X, "eval/reward_mean")
    if ey:  # eval_every: the same held-out prompts each time
        ax.plot(ex, ey, color="black", lw=LW, marker="o", label="held-out reward (eval_every)")
    ax.legend()
    _save(fig, out / "ppo_reward.png")
    return "![PPO reward](ppo_reward.png)"


def _ppo_kl_plot(rows, kx, ky, out: Path) -> str:
    """KL to the reference per iteration, and the held-out KL; -> the markdown image."""
    fig, ax = _new("KL to the reference policy", _PPO_XLABEL, "KL (nats / response, summed over tokens)")
    ax.plot(kx, ky, color="tab:red", lw=LW, marker="." if len(kx) < 50 else None, label="KL(policy || reference)")
    ex, ey = _series(rows, _PPO_X, "eval/kl")
    if ey:
        ax.plot(ex, ey, color="black", lw=LW, marker="o", label="held-out KL (eval_every)")
    ax.legend()
    _save(fig, out / "ppo_kl.png")
    return "![PPO KL](ppo_kl.png)"


def _ppo_losses_plot(policy: tuple[list, list], value: tuple[list, list], out: Path) -> str:
    """Policy and value loss side by side ((x, y) each; an empty y leaves its panel blank); -> the markdown image."""
    import matplotlib.pyplot as plt  # deferred: loading matplotlib takes seconds

    (px, py), (vx, vy) = policy, value
    fig, (a1, a2) = plt.subplots(1, 2, figsize=FIGSIZE, dpi=DPI)
    for ax, x, y, title, unit, color in ((a1, px, py, "policy loss", "clipped surrogate (token mean)", "tab:blue"),
                                         (a2, vx, vy, "value loss", "clipped squared error (token mean)",
                                          "tab:purple")):
        _style(ax, title.capitalize(), _PPO_XLABEL, unit)
        if y:
            ax.plot(x, y, color=color, lw=LW, marker="." if len(x) < 50 else None, label=title)
            ax.legend()
    fig.suptitle("PPO losses")
    _save(fig, out / "ppo_losses.png")
    return "![PPO losses](ppo_losses.png)"


def _ppo_length_plot(lx, ly, out: Path) -> str:
    """Mean response length per iteration, from 0; -> the markdown image."""
    fig, ax = _new("Response length", _PPO_XLABEL, "length (tokens, mean over the batch)")
    ax.plot(lx, ly, color="tab:brown", lw=LW, marker="." if len(lx) < 50 else None, label="response length")
    ax.set_ylim(bottom=0)
    ax.legend()
    _save(fig, out / "ppo_response_length.png")
    return "![PPO response length](ppo_response_length.png)"


def _ppo_phase_table(rows) -> list[str]:
    """Markdown table of the mean seconds per iteration of each logged time/ phase; [] when none is logged."""
    phases = sorted({k for r in rows for k in r if k.startswith("time/")})
    if not phases:
        return []
    md = ["Mean seconds per iteration, by phase:", "", "| phase | seconds |", "|---|---:|"]
    for k in phases:
        _, v = _series(rows, _PPO_X, k)
        if v:
            md.append(f"| {k[5:]} | {sum(v) / len(v):.3f} |")
    return md


def _plot_ppo(stage: Stage, rows, out: Path, md: list[str]) -> dict[str, Any]:
    X = _PPO_X
    made: list[str] = []
    xs, mean = _series(rows, X, "reward_mean")
    if mean:
        made.append(_ppo_reward_plot(rows, xs, mean, out))
    kx, ky = _series(rows, X, "kl")
    if ky:
        made.append(_ppo_kl_plot(rows, kx, ky, out))
    px, py = _series(rows, X, "policy_loss")
    vx, vy = _series(rows, X, "value_loss")
    if py or vy:
        made.append(_ppo_losses_plot((px, py), (vx, vy), out))
    lx, ly = _series(rows, X, "response_length")
    if ly:
        made.append(_ppo_length_plot(lx, ly, out))
    if not made:
        md.append("- PPO: no plottable values in ppo/metrics.jsonl; plots skipped.")
        return {}
    md += ["### PPO", ""] + [f"{m}\n" for m in made]
    md += _ppo_phase_table(rows)
    last = rows[-1] if rows else {}
    return {"PPO iterations": xs[-1] if xs else last.get(X), "PPO reward mean (last)": mean[-1] if mean else None,
            "PPO KL (last)": ky[-1] if ky else None, "PPO response length (last)": ly[-1] if ly else None,
            "PPO entropy (last)": last.get("entropy"), "PPO clip fraction (last)": last.get("clip_frac"),
            "held-out reward (last eval)": next((r["eval/reward_mean"] for r in reversed(rows)
                                                 if "eval/reward_mean" in r), None)}


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.1f}" if v.is_integer() else f"{v:.4g}"
    return str(v)


def make_report(save_dir: str | os.PathLike) -> Path:
    """Write save_dir/report/{*.png, report.md}; return the path of report.md."""
    import matplotlib  # deferred: loading matplotlib takes seconds

    matplotlib.use("Agg")  # files only: no display is needed or wanted

    save = Path(save_dir)
    if not save.is_dir():
        raise FileNotFoundError(f"{save}: run directory not found")
    out = save / "report"
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    sections: list[str] = []
    summary: dict[str, Any] = {}
    for stage in STAGES.values():
        rel, title = f"{stage.out_dir}/metrics.jsonl", stage.report.title
        path = save / rel
        if not path.is_file():
            sections.append(f"- {title}: `{rel}` not found; stage skipped.")
            continue
        rows, summaries = _read(path, notes)
        if not rows:
            sections.append(f"- {title}: `{rel}` has no metric rows; stage skipped.")
            continue
        plot = _plot_offline if stage.report.metric else _plot_ppo
        summary.update(plot(stage, rows, out, sections))
        if summaries and isinstance(summaries[-1].get("seconds"), (int, float)):
            summary[f"{title} wall time (s)"] = summaries[-1]["seconds"]

    md = [f"# Run report: `{save.resolve().name}`", "", f"From the local metrics files of `{save}`.", ""]
    rows = [(k, v) for k, v in summary.items() if v is not None]
    if rows:
        md += ["## Summary", "", "| metric | final value |", "|---|---:|"]
        md += [f"| {k} | {_fmt(v)} |" for k, v in rows] + [""]
    md += ["## Training curves", ""] + sections + [""]
    eval_md = save / "eval" / "results.md"
    if eval_md.is_file():
        body = eval_md.read_text(encoding="utf-8").splitlines()
        if body and body[0].startswith("# "):
            body = body[1:]  # our own heading replaces the file's
        while body and not body[0].strip():
            body = body[1:]
        md += ["## Evaluation (from eval/results.md)", ""] + body + [""]
    else:
        md += ["## Evaluation", "", "No `eval/results.md`; run `rlhf-dist eval CONFIG` to add held-out metrics.", ""]
    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    report = out / "report.md"
    tmp = out / ".report.md.tmp"
    tmp.write_text("\n".join(md), encoding="utf-8")
    os.replace(tmp, report)
    log.info("report: %s", report)
    return report


def cli_report(args) -> int:
    """`rlhf-dist report SAVE_DIR`."""
    setup_logging("INFO")
    print(make_report(args.save_dir))
    return 0
