"""Reading a source: every row parsed in its layout, bad rows named and, with `bad_rows: skip`, counted against
`max_bad_fraction`. Nothing is skipped silently. `scan` holds one row at a time; `read_dataset` keeps them all
(the offline stages), `prompts.open_prompts` keeps only their keys (the online stage's prompt set)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from .layouts import KIND_COLUMNS, PARSERS, detect, remap
from .rows import DataError, ReadStats, RowError
from .sources import DataSpec, Source, open_source

log = logging.getLogger(__name__)

Keep = Callable[[int, Any], None]  # (the row's key in its source, the parsed example)


def scan(spec: DataSpec, kind: str, bad_rows: str, max_bad_fraction: float, keep: Keep | None = None,
         stats: ReadStats | None = None, source: Source | None = None) -> ReadStats:
    """Parse every row of `spec` as `kind` (sft | preference | prompt), passing each good one to `keep`.

    A bad row raises DataError naming the field and the row (bad_rows: error), or is counted (skip); a DataError
    from `keep` (e.g. a row over max_length) gets the field's name too.
    """
    stats = stats if stats is not None else ReadStats()
    source, parse = source or open_source(spec), PARSERS[kind]
    for key, where, value in source.rows(stats):
        try:
            if isinstance(value, RowError):
                raise value
            row = remap(value, spec.columns)
            example = parse(row, where)
        except RowError as e:
            _bad(spec, stats, f"{where}: {e}{_hint(spec, kind, value, e)}", bad_rows)
            continue
        if not stats.layout:
            layout = detect(kind, row)
            stats.layout = layout.name
            log.info("%s: %s layout (%s)", spec.field or source.label, layout.name, layout.writers)
        if keep is not None:
            try:
                keep(key, example)
            except RowError as e:
                _bad(spec, stats, f"{where}: {e}", bad_rows)
                continue
            except DataError as e:  # e.g. over max_length: name the field too
                if spec.field and not str(e).startswith(f"{spec.field}:"):
                    raise spec.error(str(e)) from None
                raise
        stats.rows += 1
    total = stats.rows + stats.skipped
    if total == 0:
        raise spec.error(f"{source.label}: no rows")
    if stats.skipped:
        log.warning("%s: skipped %d bad rows of %d, e.g. %s", source.label, stats.skipped, total,
                    "; ".join(stats.skipped_examples))
        if stats.skipped / total > max_bad_fraction:
            raise spec.error(f"{source.label}: {stats.skipped} of {total} rows are bad, over max_bad_fraction "
                             f"{max_bad_fraction}; e.g. {stats.skipped_examples[0]}")
    return stats


def _bad(spec: DataSpec, stats: ReadStats, line: str, bad_rows: str) -> None:
    if bad_rows == "error":
        raise spec.error(line)
    stats.skipped += 1
    if len(stats.skipped_examples) < 5:
        stats.skipped_examples.append(line)


def _hint(spec: DataSpec, kind: str, row: Any, e: RowError) -> str:
    """For a missing column: the row's columns, and the fields that map other names onto the expected ones."""
    if not isinstance(row, dict) or not str(e).startswith("missing field") or not spec.field:
        return ""
    prefix = spec.field.removesuffix("_data_path")
    fields = ", ".join(f"{prefix}_{c}_field" for c in KIND_COLUMNS[kind])
    return f" (the row's columns: {', '.join(map(str, row))}; map yours with {fields})"


def read_dataset(source: str | Path | DataSpec, kind: str, bad_rows: str = "error",
                 max_bad_fraction: float = 0.01) -> tuple[list, ReadStats]:
    """Read and validate a whole source of `kind` (sft | preference | prompt) into a list of examples."""
    spec = source if isinstance(source, DataSpec) else DataSpec(str(source))
    rows: list = []
    stats = scan(spec, kind, bad_rows, max_bad_fraction, lambda key, example: rows.append(example))
    return rows, stats
