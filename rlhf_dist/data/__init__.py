"""Data: what every stage reads, from wherever it is, in whatever common layout it comes in.

- `rows`: the records (SFT conversations, preference pairs, prompts), `DataError` and `RowError`.
- `sources`: files (JSONL, Parquet, JSON, CSV, Arrow), globs of shards, `save_to_disk` directories, hub ids.
- `layouts`: the layouts detected by their columns, and the one parser per kind of row.
- `read`: a source read and validated row by row, bad rows named (`read_dataset`, `scan`).
- `prompts`: the online stage's prompt set, read on demand, so a million prompts need not fit in memory.
- `encode`: messages -> tokens (the one formatting function), length checks, padding.

User documentation: docs/data.md.
"""
