"""An HTTP reward server as a reward source (`reward_url`), as OpenRLHF's remote reward URL.

It POSTs JSON batches of at most reward_url_batch_size samples, reward_url_concurrency at a time:
    request:  {"prompts": [...], "responses": [...], "sample_ids": [...], "metadata": [...]}
    response: {"scores": [...]}, one number per sample (null: that sample could not be scored, an error).
Prompts are the last message before each response; metadata holds each sample's prompt row less its prompt.

A request that times out, loses its connection or gets a 5xx or 429 is retried reward_url_retries times,
after 0.5 s, 1 s, 2 s...; a reply that is malformed, has the wrong number of scores or another status is
not (the server answered; asking again would get the same answer). Samples whose request failed get the
outcome timeout (the last try timed out) or error, and no score. `reward_url: env:NAME` reads the URL, and
any token in it, from the environment variable NAME where the reward role runs, so neither reaches the config
snapshot, the logs or W&B; failures are logged by kind and HTTP status, never with the URL.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re

import torch

from ..algo import Outcome
from ..config import ConfigError
from .base import RewardBatch, Scored

_ENV = re.compile(r"env:([A-Za-z_][A-Za-z0-9_]*)")
_RETRIED_STATUS = (429,)  # and every 5xx


class BadReply(Exception):
    """The server answered, but not with one number (or null) per sample."""


class Transient(Exception):
    """Worth another try: a timeout, a dropped connection, a 5xx or 429."""

    def __init__(self, why: str, timeout: bool):
        super().__init__(why)
        self.timeout = timeout


def resolve_url(value: str) -> str:
    """reward_url as given, or with `env:NAME` the value of the environment variable NAME."""
    m = _ENV.fullmatch(value)
    if m is None:
        return value
    url = os.environ.get(m.group(1))
    if not url:
        raise ConfigError(f"reward_url: {value} but the environment variable {m.group(1)} is not set (here: "
                          "where the reward role runs)")
    return url


def environment_errors(cfg) -> list[str]:
    try:
        resolve_url(cfg.reward_url)
    except ConfigError as e:
        return [str(e)]
    return []


def parse_scores(body: bytes, n: int) -> list[float | None]:
    """The reply's scores: n numbers or nulls, or BadReply saying what is wrong (not quoting the body)."""
    try:
        data = json.loads(body)
    except ValueError:
        raise BadReply("malformed JSON") from None
    scores = data.get("scores") if isinstance(data, dict) else None
    if not isinstance(scores, list):
        raise BadReply("no 'scores' list in the reply")
    if len(scores) != n:
        raise BadReply(f"{len(scores)} scores for {n} samples")
    for v in scores:
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise BadReply(f"a score is {type(v).__name__} {v!r:.20}, not a finite number")
    return [None if v is None else float(v) for v in scores]


class HTTPSource:
    def __init__(self, url: str, *, timeout_s: float, retries: int, concurrency: int, batch_size: int,
                 backoff_s: float = 0.5):
        self.url = url  # may hold a token: never logged, never in an error message
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.concurrency, self.batch_size = concurrency, batch_size

    def __repr__(self) -> str:  # the URL stays out of reprs (tracebacks, debuggers)
        return f"HTTPSource(timeout_s={self.timeout_s}, retries={self.retries})"

    def score(self, batch: RewardBatch) -> Scored:
        return asyncio.run(self._score(batch))

    async def _score(self, batch: RewardBatch) -> Scored:
        import aiohttp  # deferred: only a run with reward_url needs it (it comes with Ray)

        texts = batch.prompt_texts
        spans = [(s, min(s + self.batch_size, len(batch))) for s in range(0, len(batch), self.batch_size)]
        gate = asyncio.Semaphore(self.concurrency)
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=self.concurrency)) as sess:
            parts = await asyncio.gather(*(self._chunk(sess, gate, {
                "prompts": texts[s:e], "responses": batch.responses[s:e], "sample_ids": batch.sample_ids[s:e],
                "metadata": batch.metadata[s:e]}, e - s) for s, e in spans))
        scores = torch.tensor([math.nan if v is None else v for p, _, _ in parts for v in p], dtype=torch.float32)
        outcomes = torch.tensor([o for _, p, _ in parts for o in p], dtype=torch.int8)
        return Scored(scores, outcomes, next((d for _, _, d in parts if d), None))

    async def _chunk(self, sess, gate: asyncio.Semaphore, payload: dict, n: int):
        """One request with its retries -> (scores, outcomes, the failure or None)."""
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                async with gate:
                    vals = await self._post(sess, payload, n)
                nulls = sum(v is None for v in vals)
                return vals, [Outcome.ERROR if v is None else Outcome.OK for v in vals], (
                    f"the server gave null for {nulls} of {n} samples" if nulls else None)
            except BadReply as e:
                return [None] * n, [Outcome.ERROR] * n, str(e)
            except Transient as e:
                last = e
        kind = Outcome.TIMEOUT if last.timeout else Outcome.ERROR
        return [None] * n, [kind] * n, f"{last} ({self.retries + 1} tries)"

    async def _post(self, sess, payload: dict, n: int) -> list[float | None]:
        import aiohttp  # deferred, as above

        try:
            async with sess.post(self.url, json=payload) as resp:
                body = await resp.read()
                status = resp.status
        except asyncio.TimeoutError:
            raise Transient(f"timed out after {self.timeout_s:g}s", timeout=True) from None
        except aiohttp.ClientError as e:  # the type only: aiohttp's messages can quote the URL
            raise Transient(f"connection failed ({type(e).__name__})", timeout=False) from None
        if status >= 500 or status in _RETRIED_STATUS:
            raise Transient(f"HTTP {status}", timeout=False)
        if status != 200:
            raise BadReply(f"HTTP {status}")
        return parse_scores(body, n)


def build(cfg, ctx) -> HTTPSource:
    return HTTPSource(resolve_url(cfg.reward_url), timeout_s=cfg.reward_url_timeout_s, retries=cfg.reward_url_retries,
                      concurrency=cfg.reward_url_concurrency, batch_size=cfg.reward_url_batch_size)
