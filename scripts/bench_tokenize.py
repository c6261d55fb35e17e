"""Tokenising an offline stage's rows: the Python loop the SFT stage runs (`encode.tokenize_sft`) against
`datasets.map` over the same rows, on its first run (tokenise and write its Arrow cache) and on a second run
(the same fingerprint: read back from the cache).

    python scripts/bench_tokenize.py --n 20000

The rows are SFT conversations (`messages`, one user and one assistant turn) and the tokenizer is the tiny demo
tokenizer with its chat template. `datasets.map` runs the same function per row in one process (num_proc 1);
the figures say what its cache would save on a rerun, which the loop pays again. The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_tokenize_"))
    os.environ["HF_DATASETS_CACHE"] = str(work / "hf_cache")  # before datasets is imported

    import datasets

    from rlhf_dist.data.encode import encode_conversation, tokenize_sft
    from rlhf_dist.data.rows import ReadStats, SFTExample
    from rlhf_dist.demo import generate_demo_data
    from rlhf_dist.demo.tiny import _texts, build_tokenizer

    datasets.disable_progress_bars()
    demo = generate_demo_data(work / "demo", 0)
    tok = build_tokenizer(_texts([demo[k] for k in ("sft", "prefs", "prompts", "eval")]))
    rows = [{"messages": [{"role": "user", "content": f"How is the river number {i}?"},
                          {"role": "assistant", "content": f"The river number {i} is calm and clear today."}]}
            for i in range(args.n)]

    t = time.perf_counter()
    loop = tokenize_sft(tok, [SFTExample(r["messages"], str(i)) for i, r in enumerate(rows)], 256, False, ReadStats())
    loop_s = time.perf_counter() - t

    def encode(row):
        e = encode_conversation(tok, row["messages"])
        return {"input_ids": e.input_ids, "loss_mask": e.loss_mask}

    datasets.Dataset.from_list(rows).save_to_disk(work / "rows")  # a memory-mapped source, as users bring
    ds = datasets.load_from_disk(str(work / "rows"))
    out = {"n": args.n, "loop_s": round(loop_s, 2)}
    for run in ("map_first_s", "map_cached_s"):
        t = time.perf_counter()
        mapped = ds.map(encode, remove_columns=["messages"], desc=None)
        out[run] = round(time.perf_counter() - t, 2)
    assert mapped[args.n - 1]["input_ids"] == loop[-1].input_ids  # the same tokens either way
    print(f"{args.n} SFT rows: loop {out['loop_s']} s, datasets.map first run {out['map_first_s']} s, "
          f"cached rerun {out['map_cached_s']} s")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
