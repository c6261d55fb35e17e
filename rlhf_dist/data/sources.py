"""Sources: where a `*_data_path` field's rows come from, read one row at a time.

- A JSONL file (or any file without one of the extensions below) is read line by line with msgspec, as always:
  a row is named `/abs/file.jsonl:line`. A UTF-8 BOM at the start and CRLF line endings are accepted; blank
  lines are skipped and counted; invalid UTF-8 is a bad row.
- Parquet, JSON, CSV and Arrow files, globs of shards, directories written by `save_to_disk`, and hub ids
  (with `{stage}_data_split` and `{stage}_data_subset`) load through the `datasets` library into memory-mapped
  Arrow: a row is named `source[split]:index` (a CSV row `/abs/file.csv:line`).

Every source gives each good row a key (a byte offset or a row index), so a prompt set can keep only its keys
and read a row again when it is sampled (`prompts.PromptSet`).
"""

from __future__ import annotations

import dataclasses
import glob
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import msgspec

from .layouts import KIND_COLUMNS
from .rows import DataError, ReadStats, RowError

BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".arrow": "arrow"}  # else: JSONL
SAVE_TO_DISK = ("dataset_info.json", "dataset_dict.json", "state.json")  # what save_to_disk writes
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_OFFSET_BITS = 40  # a JSONL key: file index << 40 | byte offset (files up to 1 TiB)


@dataclass(frozen=True)
class DataSpec:
    """One configured source: a `*_data_path` value with its split, subset and column names."""

    path: str
    field: str | None = None  # the config field, named in every error (None: a path given directly)
    split: str = "train"
    subset: str | None = None
    columns: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)  # canonical -> (theirs, config field)

    def error(self, msg: str) -> DataError:
        return DataError(f"{self.field}: {msg}" if self.field else msg)


def data_spec(cfg, path_field: str, kind: str, path: str | Path | None = None) -> DataSpec:
    """The source `path_field` (e.g. "reward_data_path") names, with the split, subset and column fields of the
    same prefix (`reward_data_split`, `reward_chosen_field`, ...); `path` overrides the field's value."""
    prefix = path_field.removesuffix("_data_path")
    cols = {}
    for c in KIND_COLUMNS[kind]:
        name = f"{prefix}_{c}_field"
        theirs = getattr(cfg, name, None)  # eval's rows have a prompt field only
        if theirs:
            cols[c] = (theirs, name)
    return DataSpec(str(path if path is not None else getattr(cfg, path_field)), path_field,
                    getattr(cfg, f"{prefix}_data_split"), getattr(cfg, f"{prefix}_data_subset"), cols)


class JsonlSource:
    """JSONL files (one, or a glob's shards in sorted order); keys are file index << 40 | byte offset."""

    def __init__(self, files: list[Path], label: str):
        self.files, self.label = files, label
        self._decoder = msgspec.json.Decoder()

    def rows(self, stats: ReadStats) -> Iterator[tuple[int, str, Any]]:
        for i, p in enumerate(self.files):
            offset = 0
            with open(p, "rb") as f:
                for lineno, raw in enumerate(f, 1):
                    key, where, offset = (i << _OFFSET_BITS) | offset, f"{p}:{lineno}", offset + len(raw)
                    if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                        raw = raw[3:]
                    if not raw.strip():
                        stats.blank += 1
                        continue
                    yield key, where, self._decode(raw)

    def _decode(self, raw: bytes) -> Any:
        try:
            raw.decode("utf-8")
            return self._decoder.decode(raw)
        except UnicodeDecodeError as e:
            return RowError(f"invalid UTF-8 at byte {e.start}")
        except msgspec.DecodeError as e:
            return RowError(f"malformed JSON: {e}")

    def get(self, key: int) -> tuple[str, Any]:
        p, offset = self.files[key >> _OFFSET_BITS], key & ((1 << _OFFSET_BITS) - 1)
        with open(p, "rb") as f:
            f.seek(offset)
            raw = f.readline()
        return f"{p} (byte {offset})", self._decode(raw.removeprefix(b"\xef\xbb\xbf"))


class ArrowSource:
    """A `datasets.Dataset` (memory-mapped Arrow); keys are row indexes."""

    def __init__(self, ds, label: str, split: str, csv: bool = False):
        self.ds, self.label, self.split, self.csv = ds, label, split, csv

    def where(self, index: int) -> str:
        # A CSV row's line, past the header (a cell spanning lines shifts it).
        return f"{self.label}:{index + 2}" if self.csv else f"{self.label}[{self.split}]:{index}"

    def rows(self, stats: ReadStats) -> Iterator[tuple[int, str, Any]]:
        index = 0
        for batch in self.ds.iter(batch_size=1024):
            names = list(batch)
            for values in zip(*(batch[n] for n in names)):
                yield index, self.where(index), _present(dict(zip(names, values)))
                index += 1

    def get(self, key: int) -> tuple[str, Any]:
        return self.where(key), _present(self.ds[key])


Source = JsonlSource | ArrowSource


def _present(row: dict) -> dict:
    """Arrow fills a column a row lacks with None: treat it as missing, as in JSONL."""
    return {k: v for k, v in row.items() if v is not None}


def open_source(spec: DataSpec) -> Source:
    """The source `spec.path` names: a file, a glob, a `save_to_disk` directory or a hub id."""
    p = Path(spec.path).expanduser()
    if p.is_file():
        files = [p.resolve()]
    elif p.is_dir():
        if not any((p / f).is_file() for f in SAVE_TO_DISK):
            raise spec.error(f"{p.resolve()} is a directory but not one written by save_to_disk; give a file or a "
                             "glob of shards (e.g. dir/*.parquet)")
        return _from_disk(spec, p.resolve())
    elif glob.has_magic(spec.path):
        files = [Path(f).resolve() for f in sorted(glob.glob(str(p), recursive=True)) if Path(f).is_file()]
        if not files:
            raise spec.error(f"no files match {Path(spec.path).expanduser().absolute()}")
    elif _HUB_ID.fullmatch(spec.path) and not spec.path.startswith((".", "~")) and not p.parent.is_dir():
        return _from_hub(spec)  # "data/x.jsonl" where ./data exists is a missing file, not the hub's org "data"
    else:
        raise spec.error(f"{p.absolute()}: data file not found")
    builders = {BUILDERS.get(f.suffix.lower()) for f in files}
    if len(builders) > 1:
        raise spec.error(f"{spec.path} mixes file types ({', '.join(sorted({f.suffix for f in files}))})")
    builder = builders.pop()
    label = str(files[0]) if len(files) == 1 else str(Path(spec.path).expanduser().absolute())
    if builder is None:
        return JsonlSource(files, label)
    return ArrowSource(_load(spec, builder, data_files=[str(f) for f in files]), label, "train",
                       csv=builder == "csv" and len(files) == 1)


def _datasets():
    import datasets  # here, not at the top: a heavy import that JSONL-only runs never need

    datasets.disable_progress_bars()
    return datasets


def _load(spec: DataSpec, builder: str, **kw):
    try:
        return _datasets().load_dataset(builder, split="train", **kw)
    except Exception as e:  # datasets raises many types for one unreadable file; one line names the source
        raise spec.error(f"{spec.path}: cannot be read as {builder}: {_first_line(e)}") from None


def _from_disk(spec: DataSpec, p: Path) -> ArrowSource:
    try:
        ds = _datasets().load_from_disk(str(p))
    except Exception as e:  # a damaged or partial directory
        raise spec.error(f"{p}: cannot be read as a save_to_disk directory: {_first_line(e)}") from None
    if hasattr(ds, "keys"):  # a DatasetDict: pick the split
        if spec.split not in ds:
            split_field = f"{(spec.field or '*_data_path').removesuffix('_data_path')}_data_split"
            raise spec.error(f"{p}: no split {spec.split!r} (splits: {', '.join(ds)}); set {split_field}")
        ds = ds[spec.split]
    return ArrowSource(ds, str(p), spec.split)


def _from_hub(spec: DataSpec) -> ArrowSource:
    try:
        ds = _datasets().load_dataset(spec.path, spec.subset, split=spec.split)
    except Exception as e:  # no network, no such dataset, no such split: one line naming the id
        raise spec.error(f"hub dataset {spec.path!r} (split {spec.split!r}"
                         f"{f', subset {spec.subset!r}' if spec.subset else ''}) cannot be loaded: "
                         f"{_first_line(e)}") from None
    return ArrowSource(ds, spec.path, spec.split)


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"
