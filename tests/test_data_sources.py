"""Bring your own data: sources (Parquet, save_to_disk, JSON shards, CSV, Arrow, hub ids), layouts (HH-RLHF,
UltraFeedback, TRL, OpenAI messages), column maps, the on-demand prompt set, and `rlhf-dist check`.
One process, no Ray: the datasets are built with `datasets` inside each test."""

from __future__ import annotations

import json

import pytest
from conftest import base_config

from rlhf_dist.config import load_config
from rlhf_dist.data.encode import tokenize_rows
from rlhf_dist.data.layouts import parse_preference_row, parse_prompt_row, parse_sft_row
from rlhf_dist.data.prompts import open_prompts
from rlhf_dist.data.read import read_dataset
from rlhf_dist.data.rows import DataError, ReadStats
from rlhf_dist.data.sources import DataSpec, data_spec
from rlhf_dist.models.load import load_tokenizer
from rlhf_dist.online.prompts import PromptSampler

datasets = pytest.importorskip("datasets")

SFT = [{"messages": [{"role": "user", "content": f"How is the river {i}?"},
                     {"role": "assistant", "content": f"The river is calm today, {i}."}]} for i in range(6)]
PREFS = [{"prompt": f"Say something about tea {i}.", "chosen": "Tea is lovely.", "rejected": f"Tea is bad {i}.",
          "margin": float(i)} for i in range(6)]
PROMPTS = [{"prompt": f"Tell me about the park {i}.", "answer": f"a{i}"} for i in range(6)]
ROWS = {"sft": SFT, "preference": PREFS, "prompt": PROMPTS}


@pytest.fixture(scope="module")
def tok(tiny):
    return load_tokenizer(str(tiny["model"]))


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """datasets' Arrow cache of the files these tests load goes to the test's tmp dir, not ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_source(kind: str, tmp_path, rows) -> str:
    """`rows` written as a source of `kind`; returns the *_data_path value."""
    ds = datasets.Dataset.from_list(rows)
    if kind == "parquet":
        ds.to_parquet(tmp_path / "d.parquet")
        return str(tmp_path / "d.parquet")
    if kind == "save_to_disk":
        datasets.DatasetDict({"train": ds}).save_to_disk(tmp_path / "saved")
        return str(tmp_path / "saved")
    if kind == "json_shards":
        for i in range(2):
            ds.shard(2, i, contiguous=True).to_json(tmp_path / f"shard-{i}.json")
        return str(tmp_path / "shard-*.json")
    if kind == "csv":
        ds.to_csv(tmp_path / "d.csv", index=False)
        return str(tmp_path / "d.csv")
    raise AssertionError(kind)


def encoded(tok, kind, rows):
    return [json.dumps(x, default=vars, sort_keys=True) for x in tokenize_rows(tok, kind, rows, 256, False, ReadStats())]


@pytest.mark.parametrize("source", ["parquet", "save_to_disk", "json_shards", "csv"])
@pytest.mark.parametrize("kind", ["sft", "preference", "prompt"])
def test_each_source_encodes_like_the_same_rows_in_jsonl(tok, tmp_path, source, kind):
    rows = ROWS[kind]
    if source == "csv" and kind == "sft":  # a CSV cell holds text, not a message list
        rows = [{"prompt": r["messages"][0]["content"], "response": r["messages"][1]["content"]} for r in rows]
    want, _ = read_dataset(write_jsonl(tmp_path / "d.jsonl", rows), kind)
    got, stats = read_dataset(write_source(source, tmp_path, rows), kind)
    assert stats.rows == len(rows) and stats.layout
    assert encoded(tok, kind, got) == encoded(tok, kind, want)
    if kind == "prompt":
        assert [r.fields for r in got] == [{"answer": f"a{i}"} for i in range(6)]


def test_rows_are_named_by_file_and_line_or_split_and_index(tmp_path):
    bad = PREFS[:2] + [{"prompt": "p", "chosen": "same", "rejected": "same"}]
    with pytest.raises(DataError, match=r"d\.csv:4: 'chosen' and 'rejected' are identical"):
        read_dataset(write_source("csv", tmp_path, bad), "preference")
    with pytest.raises(DataError, match=r"saved\[train\]:2: 'chosen' and 'rejected' are identical"):
        read_dataset(write_source("save_to_disk", tmp_path, bad), "preference")
    with pytest.raises(DataError, match=r"reward_data_path: .*saved: no split 'test' \(splits: train\)"):
        read_dataset(DataSpec(str(tmp_path / "saved"), "reward_data_path", split="test"), "preference")
    with pytest.raises(DataError, match=rf"sft_data_path: {tmp_path}/nope.parquet: data file not found"):
        read_dataset(DataSpec(str(tmp_path / "nope.parquet"), "sft_data_path"), "sft")


HH = "\n\nHuman: {q}\n\nAssistant: {a}"


@pytest.mark.parametrize("theirs, ours", [
    # HH-RLHF: whole transcripts, split at the shared prefix (multi-turn: the prompt keeps the earlier turns).
    ({"chosen": HH.format(q="Hi", a="Hello!") + HH.format(q="Tea?", a="Yes, green."),
      "rejected": HH.format(q="Hi", a="Hello!") + HH.format(q="Tea?", a="No.")},
     {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                 {"role": "user", "content": "Tea?"}], "chosen": "Yes, green.", "rejected": "No."}),
    # UltraFeedback-binarized: the prompt's turn repeated at the start of both conversations.
    ({"prompt": "Tea?", "chosen": [{"role": "user", "content": "Tea?"}, {"role": "assistant", "content": "Yes."}],
      "rejected": [{"role": "user", "content": "Tea?"}, {"role": "assistant", "content": "No."}], "score_chosen": 8.0},
     {"prompt": "Tea?", "chosen": "Yes.", "rejected": "No."}),
    # TRL conversational, implicit prompt.
    ({"chosen": [{"role": "user", "content": "Tea?"}, {"role": "assistant", "content": "Yes."}],
      "rejected": [{"role": "user", "content": "Tea?"}, {"role": "assistant", "content": "No."}]},
     {"prompt": "Tea?", "chosen": "Yes.", "rejected": "No."}),
    # TRL conversational, explicit prompt.
    ({"prompt": [{"role": "user", "content": "Tea?"}], "chosen": [{"role": "assistant", "content": "Yes."}],
      "rejected": [{"role": "assistant", "content": "No."}]}, {"prompt": "Tea?", "chosen": "Yes.", "rejected": "No."}),
])
def test_preference_layouts_encode_like_the_projects_own_rows(tok, theirs, ours):
    assert encoded(tok, "preference", [parse_preference_row(theirs, "x")]) == \
        encoded(tok, "preference", [parse_preference_row(ours, "x")])


@pytest.mark.parametrize("kind, theirs, ours", [
    ("sft", {"prompt": [{"role": "user", "content": "Tea?"}], "completion": [{"role": "assistant", "content": "Yes."}]},
     {"prompt": "Tea?", "response": "Yes."}),
    ("sft", {"prompt": "Tea?", "completion": "Yes."}, {"prompt": "Tea?", "response": "Yes."}),
    ("prompt", {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tea?"},
                             {"role": "assistant", "content": "Yes."}], "answer": "Yes"},
     {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tea?"}], "answer": "Yes"}),
])
def test_sft_and_prompt_layouts_encode_like_the_projects_own_rows(tok, kind, theirs, ours):
    parse = {"sft": parse_sft_row, "prompt": parse_prompt_row}[kind]
    a, b = parse(theirs, "x"), parse(ours, "x")
    assert encoded(tok, kind, [a]) == encoded(tok, kind, [b])
    if kind == "prompt":
        assert a.fields == b.fields == {"answer": "Yes"}


def test_an_hh_file_with_a_bad_row(tmp_path, caplog):
    rows = [{"chosen": HH.format(q=f"Q{i}", a="good"), "rejected": HH.format(q=f"Q{i}", a="bad")} for i in range(3)]
    rows.insert(1, {"chosen": HH.format(q="one", a="a"), "rejected": HH.format(q="other", a="b")})  # no shared prompt
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    with pytest.raises(DataError, match=rf"reward_data_path: {path}:2: 'chosen' and 'rejected' share no prompt"):
        read_dataset(DataSpec(str(path), "reward_data_path"), "preference")
    with caplog.at_level("INFO", "rlhf_dist.data.read"):
        got, stats = read_dataset(DataSpec(str(path), "reward_data_path"), "preference", "skip", 0.5)
    assert (stats.rows, stats.skipped, stats.layout) == (3, 1, "chosen/rejected")
    assert "chosen/rejected layout (HH-RLHF transcripts" in caplog.text and "skipped 1 bad rows of 4" in caplog.text
    assert got[0].prompt == [{"role": "user", "content": "Q0"}] and got[0].chosen[0]["content"] == "good"


def test_column_fields_map_other_names(tiny, tmp_path):
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"conversation": r["messages"]} for r in SFT])
    prefs = write_source("parquet", tmp_path, [{"prompt": r["prompt"], "better": r["chosen"], "rejected": r["rejected"]}
                                               for r in PREFS])
    prompts = write_jsonl(tmp_path / "q.jsonl", [{"question": r["prompt"], "answer": r["answer"]} for r in PROMPTS])
    cfg = load_config(base_config(tiny, tmp_path / "run", sft_data_path=str(sft), sft_messages_field="conversation",
                                  reward_data_path=prefs, reward_chosen_field="better",
                                  ppo_data_path=str(prompts), ppo_prompt_field="question"))
    for field, kind in (("sft_data_path", "sft"), ("reward_data_path", "preference"), ("ppo_data_path", "prompt")):
        got, _ = read_dataset(data_spec(cfg, field, kind), kind)
        assert len(got) == 6
    assert got[0].prompt[0]["content"] == PROMPTS[0]["prompt"] and got[0].fields == {"answer": "a0"}
    cfg = load_config(base_config(tiny, tmp_path / "run", ppo_data_path=str(prompts), ppo_prompt_field="query"))
    with pytest.raises(DataError, match=r"ppo_data_path: .*q\.jsonl:1: missing column 'query' \(ppo_prompt_field\)"):
        read_dataset(data_spec(cfg, "ppo_data_path", "prompt"), "prompt")


def test_a_missing_column_names_the_row_columns_and_the_map_fields(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "Tea?", "good": "a", "bad": "b"}])
    with pytest.raises(DataError, match=r"p\.jsonl:1: missing field 'chosen' \(the row's columns: question, good, bad; "
                                        r"map yours with reward_prompt_field, reward_chosen_field"):
        read_dataset(DataSpec(str(path), "reward_data_path"), "preference")


@pytest.mark.parametrize("source", ["jsonl", "parquet"])
def test_the_prompt_set_is_read_on_demand_and_resumes_at_the_cursor(tok, tmp_path, source):
    rows = [{"prompt": f"Tell me about the park {i}.", "answer": str(i)} for i in range(40)]
    rows[7] = {"prompt": ""}  # a bad row, skipped: indexes are over the good rows
    path = str(write_jsonl(tmp_path / "p.jsonl", rows)) if source == "jsonl" else write_source("parquet", tmp_path, rows)
    spec = DataSpec(path, "ppo_data_path")
    prompts, stats = open_prompts(spec, tok, 48, False, "skip", 0.1)
    want, _ = read_dataset(spec, "prompt", "skip", 0.1)
    assert len(prompts) == len(want) == 39 and stats.skipped == 1
    assert [prompts[i].fields for i in range(39)] == [w.fields for w in want]
    assert [prompts.token_ids(i) for i in range(39)] == tokenize_rows(tok, "prompt", want, 48, False, ReadStats())
    # A run that stops after 3 batches of 16 and resumes from its cursor takes the prompts an unbroken run takes.
    whole = PromptSampler(len(prompts), seed=3)
    taken = [whole.next(16) for _ in range(5)]
    resumed = PromptSampler(len(prompts), seed=3, cursor=3 * 16)
    assert [resumed.next(16) for _ in range(2)] == taken[3:]
    assert [prompts[i].fields["answer"] for i in taken[4]] == [want[i].fields["answer"] for i in taken[4]]


def test_an_over_long_prompt_is_found_before_the_run(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "tea " * 5}, {"prompt": "tea " * 200}])
    with pytest.raises(DataError, match=rf"ppo_data_path: {path}:2: \d+ tokens, over max_length 32"):
        open_prompts(DataSpec(str(path), "ppo_data_path"), tok, 32, False, "error", 0.0)
    prompts, stats = open_prompts(DataSpec(str(path), "ppo_data_path"), tok, 32, True, "error", 0.0)
    assert stats.truncated == 1 and len(prompts.token_ids(1)) == 32


def test_a_hub_id_without_network_is_one_line_naming_it(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as e:
        read_dataset(DataSpec("someorg/no-such-dataset", "ppo_data_path", split="test", subset="main"), "prompt")
    msg = str(e.value)
    assert msg.startswith("ppo_data_path: hub dataset 'someorg/no-such-dataset' (split 'test', subset 'main') "
                          "cannot be loaded: ") and "\n" not in msg


# --- rlhf-dist check ---------------------------------------------------------------------------------------


def run_check(tmp_path, cfg: dict, capsys) -> tuple[int, str, str]:
    from rlhf_dist.cli.commands import main

    p = tmp_path / "c.json"
    p.write_text(json.dumps(cfg))
    code = main(["check", str(p)])
    out, err = capsys.readouterr()
    return code, out, err


def test_check_prints_each_source_its_layout_and_counts(tiny, tmp_path, capsys, drop_log_handlers):
    prefs = write_source("parquet", tmp_path, PREFS + [{"prompt": "p", "chosen": "same", "rejected": "same",
                                                         "margin": 0.0}])
    cfg = base_config(tiny, tmp_path / "run", reward_data_path=prefs, bad_rows="skip", max_bad_fraction=0.5)
    code, out, err = run_check(tmp_path, cfg, capsys)
    assert code == 0, err
    assert f"sft_data_path: {tiny['sft']}: messages layout" in out
    assert f"reward_data_path: {prefs}: prompt/chosen/rejected layout, 6 rows" in out and "1 bad rows skipped" in out
    assert "bad row skipped: " in out and "d.parquet[train]:6: 'chosen' and 'rejected' are identical" in out
    assert "ppo_data_path: " in out and out.rstrip().endswith("config and data ok")


@pytest.mark.parametrize("mistake, needle", [
    (lambda t, tiny: {"model_name": str(t / "no-such-model")}, r"model_name: directory .*no-such-model does not exist"),
    (lambda t, tiny: {"tokenizer_path": str(t / "no-such-tok")}, r"tokenizer_path: directory or file .*no-such-tok does not exist"),
    (lambda t, tiny: {"reward_fn": "no_such_module:score"}, r"reward_fn: 'no_such_module:score': No module named 'no_such_module'"),
    (lambda t, tiny: {"sft_data_path": str(write_jsonl(t / "long.jsonl", SFT[:1] + [{"prompt": "tea " * 300,
                                                                                   "response": "ok"}]))},
     r"sft_data_path: .*long\.jsonl:2: \d+ tokens, over max_length 64"),
    (lambda t, tiny: {"ppo_data_path": str(t / "nope.jsonl")}, r"ppo_data_path: .*/nope\.jsonl: data file not found"),
    (lambda t, tiny: {"ppo_iteration": 3}, r"unknown field `ppo_iteration`; did you mean `ppo_iterations`\?"),
])
def test_check_fails_on_a_newcomers_mistakes_in_one_line(tiny, tmp_path, capsys, drop_log_handlers, mistake, needle):
    import re

    code, out, err = run_check(tmp_path, base_config(tiny, tmp_path / "run", **mistake(tmp_path, tiny)), capsys)
    assert code == 2 and "config and data ok" not in out
    lines = [x for x in err.splitlines() if x.startswith("rlhf-dist: error:")]
    assert len(lines) == 1 and re.search(needle, lines[0]), err
    assert "Traceback" not in err


def test_the_online_driver_takes_its_prompts_from_the_prompt_set(tiny, tok, tmp_path):
    """The rollout gets each sampled prompt's token ids from the on-demand set, n times in a row, and the
    samples table its text (the driver's own methods, on a PPORun without roles: fake rollout actors)."""
    from types import SimpleNamespace

    import torch

    from rlhf_dist.online.driver import PPORun

    prompts, _ = open_prompts(DataSpec(str(write_jsonl(tmp_path / "p.jsonl", PROMPTS)), "ppo_data_path"), tok, 48,
                              False, "error", 0.0)
    calls = []
    actor = SimpleNamespace(generate=SimpleNamespace(remote=lambda ids, sids, *rest: calls.append((ids, sids))))
    run = PPORun.__new__(PPORun)
    run.cfg = load_config(base_config(tiny, tmp_path / "run", n_samples_per_prompt=2, ppo_mini_batch_size=4))
    run.tok, run.prompts, run.roles = tok, prompts, SimpleNamespace(rollout=[actor, actor])
    run._launch(0, [4, 1])
    assert calls == [([prompts.token_ids(4)] * 2, [8, 9]), ([prompts.token_ids(1)] * 2, [2, 3])]
    exp = SimpleNamespace(sample_ids=[8, 9, 2, 3], kl=torch.zeros(4, 2), action_mask=torch.ones(4, 2),
                          scores=torch.zeros(4))
    rows = run._sample_rows(0, exp, ["a", "b", "c", "d"], torch.ones(4, dtype=torch.bool))
    assert [r["prompt"] for r in rows] == [PROMPTS[4]["prompt"]] * 2 + [PROMPTS[1]["prompt"]] * 2
