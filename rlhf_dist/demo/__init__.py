"""The bundled demo task: say something POSITIVE about a topic.

Quality is rule-checked (`gold_score`), so the effect of RLHF can be measured without a learned judge:
SFT data is half positive and half negative (SFT learns the format, not the sentiment), preference
pairs prefer the positive response, and PPO should raise the positive rate on held-out prompts.
Like TRL's "positive IMDB" task, in miniature. Pure Python: no torch here.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

TOPICS = ["the cat", "the dog", "the garden", "this movie", "the city", "our team", "the river", "this book",
          "the weather", "the school", "the market", "this song", "the park", "the train", "the village",
          "this game", "the forest", "the museum", "the ocean", "the kitchen", "this road", "the teacher",
          "the bakery", "the library", "this phone", "the beach", "the mountain", "the festival", "the bridge",
          "the island", "the harbor", "the castle"]
# Never asked about in the PPO prompts: eval asks about these, so it measures generalisation of RLHF.
EVAL_TOPICS = ["the harbor", "the castle", "the island", "the bridge"]
POSITIVE = ["wonderful", "kind", "bright", "great", "lovely", "friendly", "beautiful", "calm", "clean", "happy",
            "warm", "gentle", "brilliant", "charming", "pleasant", "cheerful", "fresh", "delightful", "good", "nice"]
NEGATIVE = ["terrible", "rude", "dull", "awful", "ugly", "noisy", "dirty", "sad", "cold", "harsh", "boring",
            "gloomy", "nasty", "grim", "bad", "poor", "stale", "dreadful", "broken", "bleak"]
PROMPT_TEMPLATES = ["Tell me about {t}.", "What do you think of {t}?", "Describe {t}.", "How is {t}?",
                    "Say something about {t}."]
# {t}: topic, {T}: topic capitalised, {a}/{b}: two distinct words of one sentiment. 5-8 words each.
RESPONSE_TEMPLATES = ["{T} is {a} and {b}.", "I think {t} is {a}.", "{T} feels {a}, truly {b}.",
                      "{T} is very {a} today.", "Honestly, {t} is {a} and {b}.", "I find {t} {a} and quite {b}."]

_POS_RE = re.compile(r"\b(?:" + "|".join(POSITIVE) + r")\b", re.IGNORECASE)
_NEG_RE = re.compile(r"\b(?:" + "|".join(NEGATIVE) + r")\b", re.IGNORECASE)


def gold_score(response: str) -> float:
    """Positivity in [-1, 1]: (#positive - #negative) / max(1, #positive + #negative); 0 if neither."""
    pos, neg = len(_POS_RE.findall(response)), len(_NEG_RE.findall(response))
    return (pos - neg) / max(1, pos + neg)


def is_positive(response: str) -> bool:
    return gold_score(response) > 0


def positivity_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Rule-based reward, usable as `rlhf_dist.demo:positivity_reward`. Prompts are not needed."""
    if len(prompts) != len(responses):
        # A length mismatch means rewards would be attributed to the wrong samples downstream.
        raise ValueError(f"positivity_reward: {len(prompts)} prompts but {len(responses)} responses")
    return [float(gold_score(r)) for r in responses]


def answer_reward(prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float | None]:
    """Scores each response against its prompt row's `answer` field (answers.jsonl: the topic asked about),
    usable as `rlhf_dist.demo:answer_reward`: 1 if the response names the answer, else 0, plus its positivity
    (`gold_score`, in [-1, 1]). None (no score: masked out of the update) for a row without an answer."""
    return [None if "answer" not in m else float(str(m["answer"]).lower() in r.lower()) + gold_score(r)
            for r, m in zip(responses, metadata)]


def make_prompt(rng: random.Random, topic: str) -> str:
    return rng.choice(PROMPT_TEMPLATES).format(t=topic)


def make_response(rng: random.Random, topic: str, positive: bool) -> str:
    a, b = rng.sample(POSITIVE if positive else NEGATIVE, 2)
    return rng.choice(RESPONSE_TEMPLATES).format(t=topic, T=topic[:1].upper() + topic[1:], a=a, b=b)


def _write_jsonl(path: Path, rows: list) -> None:
    # newline="\n": byte-identical files on every platform.
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def generate_demo_data(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write sft.jsonl, prefs.jsonl, prompts.jsonl, eval.jsonl and answers.jsonl under `out_dir` (seeded,
    deterministic)."""
    rng = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ppo_topics = [t for t in TOPICS if t not in EVAL_TOPICS]

    # SFT: both accepted formats; sentiment is a coin flip so SFT alone stays neutral.
    sft = []
    for _ in range(1200):
        topic = rng.choice(TOPICS)
        prompt, response = make_prompt(rng, topic), make_response(rng, topic, positive=rng.random() < 0.5)
        if rng.random() < 0.25:
            sft.append({"prompt": prompt, "response": response})
        else:
            sft.append({"messages": [{"role": "user", "content": prompt},
                                     {"role": "assistant", "content": response}]})

    # Preferences: positive chosen over negative rejected; word lists are disjoint, so never equal.
    prefs = []
    for _ in range(1200):
        topic = rng.choice(TOPICS)
        row = {"prompt": make_prompt(rng, topic), "chosen": make_response(rng, topic, True),
               "rejected": make_response(rng, topic, False)}
        if rng.random() < 0.2:
            row["margin"] = 1.0
        prefs.append(row)

    # PPO prompts: mostly objects, some bare strings (both formats are accepted by the loader).
    prompts: list = []
    for _ in range(400):
        p = make_prompt(rng, rng.choice(ppo_topics))
        prompts.append(p if rng.random() < 0.1 else {"prompt": p})

    # Eval: held-out topics only, with a positive reference for perplexity / BLEU / ROUGE.
    evals = []
    for _ in range(100):
        topic = rng.choice(EVAL_TOPICS)
        evals.append({"prompt": make_prompt(rng, topic), "response": make_response(rng, topic, True)})

    # Prompts with a reference `answer` (the topic), for answer_reward: a generator of their own, so the
    # files above (and the tokenizer trained on them) do not change.
    arng = random.Random(seed + 1)
    answers = [{"prompt": make_prompt(arng, t), "answer": t} for t in (arng.choice(ppo_topics) for _ in range(200))]

    paths = {name: out / f"{name}.jsonl" for name in ("sft", "prefs", "prompts", "eval", "answers")}
    for name, rows in (("sft", sft), ("prefs", prefs), ("prompts", prompts), ("eval", evals), ("answers", answers)):
        _write_jsonl(paths[name], rows)
    return paths


def positive_label(prompts: list[str], responses: list[str]) -> list[float]:
    """1.0 for a positive response, else 0.0: as eval's `--gold rlhf_dist.demo:positive_label`, the gold
    column is the desirable rate (KTO's label on this task)."""
    if len(prompts) != len(responses):
        raise ValueError(f"positive_label: {len(prompts)} prompts but {len(responses)} responses")
    return [float(is_positive(r)) for r in responses]
