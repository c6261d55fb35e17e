"""Time and peak memory to load and tokenise a large PPO prompt set: Parquet (through `datasets`, read on demand)
against the same prompts in JSONL (read on demand), and JSONL the old way (every prompt parsed and tokenised into
memory: `read_dataset` + `tokenize_prompts`, as the online stage did before `data.prompts`).

    python scripts/bench_prompts.py                       # 1,000,000 prompts
    python scripts/bench_prompts.py --n 20000 --modes jsonl parquet

Each mode runs in a fresh process (`--child`), so its peak RSS (VmHWM) is its own: the imports and the tokenizer
(`rss_start_mib`, measured before loading) plus what loading keeps. `load_s` is `open_prompts` (one pass: parse,
tokenise, check the length, keep each good row's key), or read + tokenise for `jsonl_in_memory`; `sample_ms` is
the mean time of one iteration's prompts afterwards (`--batch` prompts drawn by the PPO sampler, their token ids
read again and tokenised). `parquet` builds datasets' Arrow cache (in --workdir) on its first load;
`parquet_cached` loads again with that cache. The tokenizer is the tiny demo tokenizer (byte-level BPE with a
chat template), so tokenising costs what a chat template costs. The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

MODES = ("jsonl_in_memory", "jsonl", "parquet", "parquet_cached")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="prompts")
    ap.add_argument("--batch", type=int, default=64, help="prompts an iteration samples (sample_ms)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--workdir", default="/tmp/bench_prompts")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def rss_mib(key: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(key)


def prepare(work: Path, n: int) -> None:
    """The tiny tokenizer, and n prompts (with an `answer` field) as JSONL and as Parquet."""
    import msgspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rlhf_dist.demo import generate_demo_data
    from rlhf_dist.demo.tiny import _texts, build_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    if (work / f"prompts_{n}.parquet").is_file():
        return
    data = generate_demo_data(work / "demo", 0)
    build_tokenizer(_texts([data[k] for k in ("sft", "prefs", "prompts", "eval")])).save_pretrained(work / "tok")
    topics = ("river", "phone", "kitchen", "garden", "weather", "movie", "city", "coffee")
    prompts = [f"Tell me about the {topics[i % len(topics)]} number {i}." for i in range(n)]
    answers = [str(i) for i in range(n)]
    enc = msgspec.json.Encoder()
    with open(work / f"prompts_{n}.jsonl", "wb") as f:
        for p, a in zip(prompts, answers):
            f.write(enc.encode({"prompt": p, "answer": a}) + b"\n")
    pq.write_table(pa.table({"prompt": prompts, "answer": answers}), work / f"prompts_{n}.parquet")


def child(args) -> dict:
    from rlhf_dist.data.encode import tokenize_prompts
    from rlhf_dist.data.prompts import open_prompts
    from rlhf_dist.data.read import read_dataset
    from rlhf_dist.data.sources import DataSpec
    from rlhf_dist.models.load import load_tokenizer
    from rlhf_dist.online.prompts import PromptSampler

    work = Path(args.workdir)
    tok = load_tokenizer(str(work / "tok"))
    suffix = "jsonl" if args.child.startswith("jsonl") else "parquet"
    spec = DataSpec(str(work / f"prompts_{args.n}.{suffix}"), "ppo_data_path")
    if suffix == "parquet":
        import datasets  # noqa: F401  (imported before the start figures, as the jsonl modes import what they use)
    start = rss_mib("VmRSS")
    t = time.perf_counter()
    if args.child == "jsonl_in_memory":
        rows, stats = read_dataset(spec, "prompt")
        ids = tokenize_prompts(tok, rows, 256, False, stats)
        n, get_ids = len(rows), ids.__getitem__
    else:
        prompts, stats = open_prompts(spec, tok, 256, False, "error", 0.0)
        n, get_ids = len(prompts), prompts.token_ids
    load_s = time.perf_counter() - t
    sampler, reps = PromptSampler(n, seed=0), 50
    sampler.next(args.batch)  # the first call shuffles the pass's order: timed apart
    t = time.perf_counter()
    for _ in range(reps):
        for i in sampler.next(args.batch):
            get_ids(i)
    return {"mode": args.child, "prompts": n, "load_s": round(load_s, 2),
            "sample_ms": round((time.perf_counter() - t) / reps * 1e3, 2),
            "rss_start_mib": round(start), "peak_rss_mib": round(rss_mib("VmHWM"))}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return {}
    work = Path(args.workdir)
    t = time.perf_counter()
    prepare(work, args.n)
    print(f"data: {args.n} prompts in {work} ({time.perf_counter() - t:.1f}s to write)", flush=True)
    env = {**os.environ, "HF_DATASETS_CACHE": str(work / "hf_cache")}
    results = []
    for mode in args.modes:
        if mode == "parquet":
            shutil.rmtree(work / "hf_cache", ignore_errors=True)  # a first load: datasets builds its cache
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--n", str(args.n), "--batch",
                              str(args.batch), "--workdir", str(work)], env=env, check=True, capture_output=True,
                             text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        r = results[-1]
        print(f"{mode:16s} load {r['load_s']:8.2f} s   sample {r['sample_ms']:7.2f} ms/iteration   "
              f"peak RSS {r['peak_rss_mib']:6d} MiB (start {r['rss_start_mib']} MiB)", flush=True)
    summary = {"n": args.n, "batch": args.batch, "results": results}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
