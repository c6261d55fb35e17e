"""The online stage's prompt set, read on demand: one pass at the start parses and tokenises every row (bad rows
and over-long prompts are found before any model loads) but keeps only each good row's key in its source, 8 bytes
a prompt. A sampled prompt is read again from the source (a JSONL line at its byte offset, or an Arrow row) and
tokenised again; the few an iteration takes are cached. Index i is the i-th good row, whatever the source, so the
prompt sampler's cursor resumes exactly."""

from __future__ import annotations

from array import array
from functools import lru_cache

from .encode import check_length, encode_prompt
from .layouts import parse_prompt_row, remap
from .read import scan
from .rows import PromptExample, ReadStats
from .sources import DataSpec, Source, open_source

_CACHED = 1 << 14  # prompts kept parsed and tokenised: several iterations' worth


class PromptSet:
    """`prompts[i]` -> PromptExample (prompt messages, `where`, the row's other `fields`); `token_ids(i)`."""

    def __init__(self, spec: DataSpec, source: Source, keys: array, tok, max_prompt_len: int):
        self.spec, self._source, self.keys, self.tok, self.max_prompt_len = spec, source, keys, tok, max_prompt_len
        self._row = lru_cache(maxsize=_CACHED)(self._read)
        self._ids = lru_cache(maxsize=_CACHED)(self._tokenise)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> PromptExample:
        if not 0 <= i < len(self.keys):
            raise IndexError(i)
        return self._row(i)

    def token_ids(self, i: int) -> list[int]:
        return self._ids(i)

    def _read(self, i: int) -> PromptExample:
        where, value = self._source.get(self.keys[i])
        return parse_prompt_row(remap(value, self.spec.columns), where)

    def _tokenise(self, i: int) -> list[int]:
        ids = encode_prompt(self.tok, self[i].prompt)
        # Over-long prompts were found (or counted, with truncate) in the first pass; keep the end: the
        # generation prompt must stay.
        return ids[-self.max_prompt_len:] if len(ids) > self.max_prompt_len else ids


def open_prompts(spec: DataSpec, tok, max_prompt_len: int, truncate: bool, bad_rows: str,
                 max_bad_fraction: float) -> tuple[PromptSet, ReadStats]:
    """Validate and tokenise every prompt of `spec` once, keeping only the keys of the good rows."""
    keys, stats = array("q"), ReadStats()

    def keep(key: int, example: PromptExample) -> None:
        check_length(len(encode_prompt(tok, example.prompt)), max_prompt_len, example.where, truncate, stats)
        keys.append(key)

    source = open_source(spec)
    scan(spec, "prompt", bad_rows, max_bad_fraction, keep, stats, source)
    return PromptSet(spec, source, keys, tok, max_prompt_len), stats
