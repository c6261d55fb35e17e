"""Reward sources (rlhf_dist/rewards/, config/rewards.py): outcomes, combining, the masking of failed samples
through the advantages and the losses, the function's metadata, and an HTTP server on 127.0.0.1 that
answers slowly, with 500s (or 404s), malformed JSON, the wrong number of scores, or drops the connection. One process,
no Ray, except the last test (slow)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlhf_dist.algo import (
    Outcome,
    RunningMoments,
    combine_scores,
    kept_samples,
    loss_units,
    outcome_counts,
    ppo_policy_loss,
)
from rlhf_dist.config import ConfigError, load_config
from rlhf_dist.config.algorithms import ALGORITHMS
from rlhf_dist.config.rewards import environment_errors
from rlhf_dist.data.read import read_dataset
from rlhf_dist.online.experience import experience_stats, make_experience, process_scores
from rlhf_dist.online.health import HealthError
from rlhf_dist.online.rewards import check_failures, kept_for, reward_metrics
from rlhf_dist.rewards.base import RewardBatch, SourceContext
from rlhf_dist.rewards.function import FunctionSource
from rlhf_dist.rewards.http import HTTPSource, parse_scores, resolve_url
from rlhf_dist.rewards.sources import RewardSources

OK, TIMEOUT, ERROR = Outcome.OK, Outcome.TIMEOUT, Outcome.ERROR
EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "examples" / "grpo_answer.yaml"


# ---------------------------------------------------------------------------------------
# The pure functions: combining, which samples stay
# ---------------------------------------------------------------------------------------

def test_combine_scores_weights_and_worst_outcome():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, math.nan, 30.0, 40.0]])  # (S=2, B=4)
    outcomes = torch.tensor([[OK, OK, TIMEOUT, OK], [OK, ERROR, OK, TIMEOUT]], dtype=torch.int8)
    total, outcome = combine_scores(scores, outcomes, torch.tensor([0.5, 2.0]))
    # sample 0: 0.5 * 1 + 2 * 10 = 20.5; the others each miss a source: 0 (a placeholder), never a partial sum
    torch.testing.assert_close(total, torch.tensor([20.5, 0.0, 0.0, 0.0]))
    assert outcome.tolist() == [OK, ERROR, TIMEOUT, TIMEOUT]  # error outranks timeout
    assert outcome_counts(outcome) == {"timeout": 2, "error": 1}


def test_kept_samples_drops_whole_groups_for_group_algorithms():
    ok = torch.tensor([True, True, True, False, True, True])
    assert kept_samples(ok, 2, whole_groups=False).tolist() == [True, True, True, False, True, True]
    assert kept_samples(ok, 2, whole_groups=True).tolist() == [True, True, False, False, True, True]
    assert kept_samples(ok, 1, whole_groups=True).tolist() == ok.tolist()  # a group of one: just the sample
    with pytest.raises(ValueError):
        kept_samples(ok, 4, whole_groups=True)
    assert [a.name for a in ALGORITHMS.values() if a.groups] == ["grpo", "rloo", "reinforce_pp"]


# ---------------------------------------------------------------------------------------
# Masking through the advantages phase and the losses
# ---------------------------------------------------------------------------------------

def _samples(B: int, R: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, R + 1, (B,), generator=g)
    mask = (torch.arange(R)[None] < lengths[:, None]).long()  # (B, R) right-padded
    return SimpleNamespace(action_mask=mask, sequences=torch.zeros(B, R + 3, dtype=torch.long),
                           attention_mask=torch.ones(B, R + 3, dtype=torch.long), prompt_len=3,
                           sample_ids=list(range(B)), version=0), g


@pytest.mark.parametrize("algorithm, n", [("grpo", 2), ("rloo", 2), ("reinforce_pp", 2), ("ppo", 1), ("ppo", 2)])
def test_failed_samples_leave_the_advantages(algorithm, n):
    """A failed sample (and with group advantages its group) gets no advantage and leaves the action mask;
    the samples kept get exactly the advantages they would get in a batch without the dropped ones (group
    statistics and whitening are over the kept samples only)."""
    B = 8
    samples, g = _samples(B)
    old = -torch.rand(B, 5, generator=g)
    ref = old - 0.1 * torch.rand(B, 5, generator=g)
    values = torch.randn(B, 5, generator=g) if ALGORITHMS[algorithm].critic else None
    scores = torch.randn(B, generator=g)
    scores[3] = math.nan  # what a failed source leaves: must not reach anything
    cfg = load_config({"model_name": "x", "algorithm": algorithm, "n_samples_per_prompt": n,
                       "ppo_whiten_advantages": True, "reward_fn": "rlhf_dist.demo:positivity_reward",
                       "reward_model_weight": 0, "ppo_mini_batch_size": 8, "ppo_batch_size": 8 // n})
    ok = torch.ones(B, dtype=torch.bool)
    ok[3] = False
    kept = kept_samples(ok, n, ALGORITHMS[algorithm].groups)
    exp = make_experience(samples, old, ref, values, scores, cfg, 0.05, kept)
    dropped = (~kept).nonzero().flatten().tolist()
    assert dropped == ([2, 3] if ALGORITHMS[algorithm].groups and n > 1 else [3])
    assert exp.action_mask[dropped].sum() == 0 and exp.advantages[dropped].abs().sum() == 0
    assert torch.isfinite(exp.advantages).all() and torch.isfinite(exp.returns).all()
    # The same batch without the dropped rows
    keep = kept.nonzero().flatten()
    sub, _ = _samples(B)
    sub.action_mask, sub.sequences, sub.attention_mask = (t[keep] for t in (sub.action_mask, sub.sequences,
                                                                             sub.attention_mask))
    alone = make_experience(sub, old[keep], ref[keep], values[keep] if values is not None else None, scores[keep], cfg,
                            0.05)
    torch.testing.assert_close(exp.advantages[keep], alone.advantages, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(exp.action_mask[keep], alone.action_mask)
    assert experience_stats(exp, kept) == pytest.approx(experience_stats(alone))  # the stats: kept samples only
    none = torch.zeros(B, dtype=torch.bool)  # nothing scored: no NaN in the stats (the update is skipped)
    assert all(math.isfinite(v) for v in experience_stats(make_experience(samples, old, ref, values, scores, cfg,
                                                                          0.05, none), none).values())


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_masked_rows_leave_the_loss_and_its_mini_batch_units(agg):
    """The rows stay in the batch (so the mini-batches split as before), but a mini-batch's loss is that
    of its kept rows alone, micro-batch by micro-batch (units = the kept rows' tokens or sequences)."""
    g = torch.Generator().manual_seed(1)
    B, T = 6, 4
    logp, old, adv = (torch.randn(B, T, generator=g) for _ in range(3))
    mask = torch.ones(B, T)
    mask[0, 3:] = 0
    kept = torch.tensor([True, False, True, True, False, True])
    masked = mask * kept[:, None]
    units = loss_units(masked, agg)
    whole, _ = ppo_policy_loss(logp, old, adv, masked, 0.2, agg, units)
    alone, _ = ppo_policy_loss(logp[kept], old[kept], adv[kept], mask[kept], 0.2, agg)
    torch.testing.assert_close(whole, alone)
    micro = sum(ppo_policy_loss(logp[i:i + 2], old[i:i + 2], adv[i:i + 2], masked[i:i + 2], 0.2, agg, units)[0]
                for i in range(0, B, 2))
    torch.testing.assert_close(micro, alone)


def test_moments_see_only_scored_samples():
    cfg = SimpleNamespace(overlong_penalty=0.0, reward_clip=None, gen_max_new_tokens=4)
    moments = RunningMoments()
    process_scores(torch.tensor([1.0, 0.0, 3.0]), None, cfg, 2, moments, torch.tensor([True, False, True]))
    assert moments.count == 2 and moments.mean == pytest.approx(2.0)


# ---------------------------------------------------------------------------------------
# The function source: old and new signatures, metadata from the prompt row
# ---------------------------------------------------------------------------------------

SEEN: list = []


def fn_plain(prompts, responses):
    return [float(len(r)) for r in responses]


def fn_with_metadata(prompts, responses, metadata):
    SEEN.append(metadata)
    return [None if m.get("answer") is None else float(m["answer"] in r) for r, m in zip(responses, metadata)]


def fn_kwargs(prompts, responses, **kw):
    return [float(len(kw["metadata"][i])) for i in range(len(responses))]


def _batch(responses, metadata=None):
    n = len(responses)
    return RewardBatch([[{"role": "user", "content": f"q{i}"}] for i in range(n)], responses, list(range(n)),
                       metadata or [{} for _ in range(n)])


def test_function_source_signatures_and_none():
    b = _batch(["ab", "abc"], [{"answer": "c"}, {"answer": "c", "x": 1}])
    assert FunctionSource(f"{__name__}:fn_plain").score(b).scores.tolist() == [2.0, 3.0]  # (prompts, responses)
    assert FunctionSource(f"{__name__}:fn_kwargs").score(b).scores.tolist() == [1.0, 2.0]  # **kwargs gets metadata
    b = _batch(["ab", "abc", "xyz"], [{"answer": "c"}, {"answer": "c"}, {}])
    out = FunctionSource(f"{__name__}:fn_with_metadata").score(b)
    assert out.scores[:2].tolist() == [0.0, 1.0] and out.outcomes.tolist() == [OK, OK, ERROR]
    assert "None for 1 of 3" in out.detail
    with pytest.raises(ConfigError, match="reward_fn: 'nope.nothing:f'"):
        FunctionSource("nope.nothing:f")
    errors = environment_errors(load_config({"model_name": "x", "reward_fn": "nope.nothing:f"}))
    assert len(errors) == 1 and errors[0].startswith("reward_fn: 'nope.nothing:f': No module named 'nope'")


def test_reward_function_receives_the_prompt_rows_answer(tmp_path, tiny, monkeypatch):
    """A prompt row's other fields reach the reward function: read as PPO reads its prompts, scored by the
    reward role (RewardWorker without Ray) as the driver calls it, sample by sample."""
    from rlhf_dist.roles.actors import RewardWorker, RoleWorker

    def plain_init(self, role, rank, config, num_cpus, device):
        self.cfg, self.role, self.rank = load_config(config), role, rank
        self.device, self.bf16, self.version = torch.device("cpu"), False, 0

    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "What is 6 x 7?", "answer": "42", "level": 1}\n"Say hi."\n')
    rows, _ = read_dataset(path, "prompt")
    assert [r.fields for r in rows] == [{"answer": "42", "level": 1}, {}]
    monkeypatch.setattr(RoleWorker, "__init__", plain_init)
    w = RewardWorker(0, {"model_name": "x", "reward_model_weight": 0, "reward_fn": f"{__name__}:fn_with_metadata"},
                     1.0, "cpu", None, str(tiny["model"]))
    tok = w.policy_tok
    resp = [tok.encode("It is 42."), tok.encode("hi")]
    R = max(map(len, resp))
    samples = SimpleNamespace(responses=torch.tensor([r + [tok.pad_token_id] * (R - len(r)) for r in resp]),
                              action_mask=torch.tensor([[1] * len(r) + [0] * (R - len(r)) for r in resp]),
                              sample_ids=[0, 1], sequences=None, attention_mask=None)
    SEEN.clear()
    out = w.score(samples, [r.prompt for r in rows], [r.fields for r in rows])
    assert SEEN == [[{"answer": "42", "level": 1}, {}]]
    assert out.score.tolist() == [1.0, 0.0] and out.outcome.tolist() == [OK, ERROR]
    assert "fn_score" in reward_metrics(out, out.outcome == OK)


# ---------------------------------------------------------------------------------------
# The HTTP source, against a real server on 127.0.0.1
# ---------------------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.requests.append((self.path, body))
            mode = srv.modes.pop(0) if len(srv.modes) > 1 else srv.modes[0]  # the last mode stays
        n = len(body["responses"])
        if mode == "drop":  # close the connection without an answer
            self.close_connection = True
            return
        if mode == "slow":
            time.sleep(srv.slow_s)
        if mode in ("500", "404"):
            return self._send(int(mode), b"oops")
        reply = {"ok": {"scores": [float(len(r)) for r in body["responses"]]},
                 "slow": {"scores": [1.0] * n},
                 "null_first": {"scores": [None] + [1.0] * (n - 1)},
                 "wrong_count": {"scores": [1.0] * (n + 1)}}.get(mode)
        self._send(200, b"{not json" if mode == "malformed" else json.dumps(reply).encode())

    def _send(self, status: int, data: bytes):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@contextlib.contextmanager
def reward_server(*modes: str, slow_s: float = 1.0):
    """A reward server on 127.0.0.1 (a free port) answering in `modes` in turn (the last one repeats);
    yields it (its .url, .requests) and stops it after."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads, srv.block_on_close = True, False  # stop without waiting for a slow answer
    srv.handle_error = lambda request, address: None  # a client gone after its timeout: a broken pipe here
    srv.modes, srv.requests, srv.lock, srv.slow_s = list(modes), [], threading.Lock(), slow_s
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/score?token=SECRET-TOKEN-123"
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)  # a quick shutdown
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        t.join()


def _http(url, **kw):
    opts = dict(timeout_s=0.5, retries=1, concurrency=2, batch_size=3, backoff_s=0.01)
    return HTTPSource(url, **{**opts, **kw})


# mode -> (outcome of every sample, requests per batch of 3: 1 + retries when retried)
FAULTS = {
    "slow": (TIMEOUT, 2),
    "500": (ERROR, 2),
    "404": (ERROR, 1),
    "malformed": (ERROR, 1),
    "wrong_count": (ERROR, 1),
    "drop": (ERROR, 2),
}


@pytest.mark.parametrize("mode", list(FAULTS))
def test_http_source_faults(mode, caplog):
    outcome, tries = FAULTS[mode]
    with reward_server(mode) as srv:
        t0 = time.perf_counter()
        out = _http(srv.url).score(_batch(["a", "bb", "ccc"]))
        seconds = time.perf_counter() - t0
    assert out.outcomes.tolist() == [outcome] * 3 and torch.isnan(out.scores).all()
    assert len(srv.requests) == tries
    assert "SECRET" not in out.detail and "127.0.0.1" not in out.detail
    print(f"\nfault {mode}: outcome {Outcome(outcome).name.lower()}, {tries} requests, {seconds:.2f}s: {out.detail}")


def test_http_source_batches_retries_and_payload():
    """7 samples in requests of 3 (3 requests); a 500 is retried and then answered; null = that sample's error."""
    meta = [{"answer": str(i)} for i in range(7)]
    with reward_server("500", "ok", "null_first", "ok") as srv:
        out = _http(srv.url, concurrency=1).score(_batch(["x" * (i + 1) for i in range(7)], meta))
    assert len(srv.requests) == 4  # one retried
    assert srv.requests[0][0] == "/score?token=SECRET-TOKEN-123"
    bodies = [b for _, b in srv.requests[1:]]
    assert sorted(i for b in bodies for i in b["sample_ids"]) == list(range(7))
    assert all(set(b) == {"prompts", "responses", "sample_ids", "metadata"} for b in bodies)
    assert all(b["metadata"] == [meta[i] for i in b["sample_ids"]] for b in bodies)
    assert all(b["prompts"] == [f"q{i}" for i in b["sample_ids"]] for b in bodies)
    assert out.outcomes.tolist().count(ERROR) == 1 and out.outcomes.tolist().count(OK) == 6
    ok = out.outcomes == OK
    assert out.scores[ok].tolist() == [float(i + 1) for i in range(7) if ok[i]]  # each sample its own score


def test_parse_scores_rejects_what_is_not_one_number_per_sample():
    assert parse_scores(b'{"scores": [1, 2.5, null]}', 3) == [1.0, 2.5, None]
    for body, why in ((b"[1, 2]", "no 'scores'"), (b'{"scores": [1]}', "1 scores for 2"),
                      (b'{"scores": [1, "x"]}', "not a finite number"), (b'{"scores": [1, true]}', "not a finite"),
                      (b'{"scores": [1, NaN]}', "not a finite"), (b"<html>", "malformed JSON")):
        with pytest.raises(Exception, match=why):
            parse_scores(body, 2)


def test_env_url_stays_out_of_the_config_and_the_logs(monkeypatch, caplog, tmp_path):
    from rlhf_dist.config import redact

    cfg = load_config({"model_name": "x", "reward_model_weight": 0, "reward_url": "env:RM_URL_TEST"})
    assert environment_errors(cfg) == ["reward_url: env:RM_URL_TEST but the environment variable RM_URL_TEST "
                                       "is not set (here: where the reward role runs)"]
    with reward_server("500") as srv:
        monkeypatch.setenv("RM_URL_TEST", srv.url)
        assert resolve_url("env:RM_URL_TEST") == srv.url and environment_errors(cfg) == []
        snapshot = json.dumps(redact(cfg.to_dict()))  # what config.json and W&B's config get
        assert '"reward_url": "env:RM_URL_TEST"' in snapshot and "SECRET" not in snapshot
        caplog.set_level(logging.DEBUG)
        src = RewardSources(cfg, SourceContext(torch.device("cpu"), False, None, None))
        src.sources["url"].backoff_s = 0.01
        out = src.score(_batch(["a", "b"]))
    assert out.outcome.tolist() == [ERROR, ERROR]
    assert "reward source url: 2 of 2 samples failed: HTTP 500 (3 tries)" in caplog.text
    assert "SECRET" not in caplog.text and "SECRET" not in repr(src.sources["url"])
    with pytest.raises(ConfigError, match="reward_url: expected an http"):
        load_config({"model_name": "x", "reward_url": "ftp://host?token=SECRET"})
    with pytest.raises(ConfigError, match="no reward source is on"):
        load_config({"model_name": "x", "reward_model_weight": 0})


def test_combined_sources_counters_and_the_stop(monkeypatch):
    """A function and a server, weighted; the server fails one sample: counted, masked with its group, each
    source's mean logged; over reward_max_failed_fraction the run stops naming the source."""
    with reward_server("null_first", "ok", "slow", slow_s=1.0) as srv:
        monkeypatch.setenv("RM_URL_TEST", srv.url)
        cfg = load_config({"model_name": "x", "algorithm": "grpo", "n_samples_per_prompt": 2, "ppo_batch_size": 2,
                           "ppo_mini_batch_size": 4, "reward_model_weight": 0, "reward_fn": f"{__name__}:fn_plain",
                           "reward_fn_weight": 2.0, "reward_url": "env:RM_URL_TEST", "reward_url_weight": 0.5,
                           "reward_url_batch_size": 2, "reward_url_concurrency": 1, "reward_url_retries": 0,
                           "reward_url_timeout_s": 0.3, "reward_max_failed_fraction": 0.25})
        src = RewardSources(cfg, SourceContext(torch.device("cpu"), False, None, None))
        out = src.score(_batch(["a", "bb", "ccc", "dddd"]))
        kept = kept_for(out, cfg)
        rec = reward_metrics(out, kept)
        check_failures(out, cfg.reward_max_failed_fraction, "iteration 1")  # 1 of 4: not over 0.25
        with pytest.raises(HealthError) as e:
            check_failures(src.score(_batch(["a", "bb", "ccc", "dddd"])), cfg.reward_max_failed_fraction, "iteration 2")
    # sample 0: the server's null, so its group (0, 1) is dropped. 2 x len (function) + 0.5 x the server's
    # score: 1 for sample 1 (null_first), len for samples 2 and 3 (ok).
    assert out.outcome.tolist() == [ERROR, OK, OK, OK] and kept.tolist() == [False, False, True, True]
    torch.testing.assert_close(out.score, torch.tensor([0.0, 4.5, 7.5, 10.0]))
    assert rec["reward_failed"] == 1 and rec["reward_failed_error"] == 1 and rec["reward_failed_timeout"] == 0
    assert rec["reward_masked"] == 2 and rec["reward_failed/url"] == 1 and rec["reward_failed/function"] == 0
    assert rec["fn_score"] == pytest.approx(2.5) and rec["url_score"] == pytest.approx(8 / 3)  # over what each scored
    msg = str(e.value)
    assert "\n" not in msg and "reward source url: 4 failed (4 timeout" in msg and "SECRET" not in msg
    print(f"\nstop: {msg}")


# ---------------------------------------------------------------------------------------
# The shipped example
# ---------------------------------------------------------------------------------------

def test_grpo_answer_example_passes_check(tiny, tmp_path, monkeypatch, capsys):
    """`rlhf-dist check configs/examples/grpo_answer.yaml` as shipped, on the init-tiny layout (runs/tiny)."""
    from rlhf_dist import demo
    from rlhf_dist.cli.commands import main

    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tiny").symlink_to(Path(tiny["model"]).parent)
    monkeypatch.chdir(tmp_path)
    assert main(["check", str(EXAMPLE)]) == 0
    assert "config and data ok" in capsys.readouterr().out
    rows, _ = read_dataset(tiny["answers"], "prompt")
    m = rows[0].fields
    assert set(m) == {"answer"} and m["answer"] in rows[0].prompt[0]["content"]
    assert demo.answer_reward(["q", "q"], [f"{m['answer']} is lovely.", "Nothing."], [m, {}]) == [2.0, None]


# ---------------------------------------------------------------------------------------
# End to end: a GRPO run scored by a function and a server (Ray; slow)
# ---------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(900)
def test_grpo_run_with_a_reward_server(tiny, tmp_path, monkeypatch, capsys):
    """`rlhf-dist ppo` (GRPO, 4 prompts x 2) with the positivity function and a server on 127.0.0.1 given as
    env:NAME. Iteration 1: the server gives null for sample 0 -> counted, its group masked, the update goes
    on; iteration 2: 500s -> over reward_max_failed_fraction, the run stops with one line naming the source.
    The row fields reached the server, and its URL (with a token) is nowhere in the run's files."""
    from conftest import base_config, iteration_rows

    from rlhf_dist.cli.commands import main
    from rlhf_dist.io.tracking import read_metrics

    save = tmp_path / "run"
    with reward_server("null_first", "500") as srv:
        monkeypatch.setenv("RM_URL_E2E", srv.url)  # before the local Ray starts: its workers inherit it
        cfg = base_config(tiny, save, algorithm="grpo", n_samples_per_prompt=2, ppo_batch_size=4,
                          ppo_mini_batch_size=8, ppo_iterations=3, save_interval=1, gen_max_new_tokens=8,
                          ppo_data_path=str(tiny["answers"]), reward_model_weight=0,
                          reward_fn="rlhf_dist.demo:positivity_reward", reward_url="env:RM_URL_E2E",
                          reward_url_weight=0.5, reward_url_retries=0, reward_max_failed_fraction=0.2,
                          roles={r: {"num_cpus": 0.4} for r in ("rollout", "policy", "reference", "reward")})
        del cfg["ppo_lr_value"]  # no critic
        path = tmp_path / "cfg.json"
        path.write_text(json.dumps(cfg))
        code = main(["ppo", str(path)])
        requests = list(srv.requests)
    err = capsys.readouterr().err
    assert code == 1, err
    stop = [line for line in err.splitlines() if line.startswith("rlhf-dist: stopped:")]
    assert len(stop) == 1 and "8 of 8 samples got no reward at iteration 2" in stop[0]
    assert "reward source url: 8 failed (8 error, HTTP 500 (1 tries))" in stop[0]
    rows = iteration_rows(save)
    assert len(rows) == 1  # iteration 1 only: iteration 2 stopped before its update
    r = rows[0]
    assert (r["reward_failed"], r["reward_failed_error"], r["reward_masked"], r["reward_failed/url"]) == (1, 1, 2, 1)
    assert r["reward_failed/function"] == 0 and r["fn_score"] is not None and r["url_score"] == 1.0
    assert r.get("skipped") is None and r["policy_loss"] is not None
    first = requests[0][1]
    assert len(first["sample_ids"]) == 8 and all(set(m) == {"answer"} for m in first["metadata"])
    assert all(m["answer"] in p for m, p in zip(first["metadata"], first["prompts"]))  # each row's own answer
    samples = read_metrics(save / "ppo" / "samples.jsonl")
    assert [s["reward"] is None for s in samples if s["iteration"] == 1][:2] == [True, True]  # group 0
    files = [p for p in save.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl", ".log", ".md", ".txt")]
    assert any(p.name == "config.json" for p in files)
    assert '"reward_url": "env:RM_URL_E2E"' in (save / "config.json").read_text()
    assert not [p for p in files if "SECRET-TOKEN" in p.read_text(errors="replace")]
    print(f"\ne2e stop line: {stop[0]}\niteration 1: " + json.dumps({k: r[k] for k in (
        "reward_failed", "reward_masked", "reward_failed/url", "fn_score", "url_score", "reward_mean")}))
