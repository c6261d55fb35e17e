"""The bundled demo task: say something POSITIVE about a topic.

Quality is rule-checked (`gold_score`), so the effect of RLHF can be measured without a learned judge:
SFT data is half positive and half negative, the preference pairs prefer the positive response, and
PPO should raise the positive rate on held-out prompts. Like TRL's "positive IMDB" task, in miniature.
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
# Held out of the PPO prompts: the eval set asks about these topics only.
EVAL_TOPICS = ["the harbor", "the castle", "the island", "the bridge"]
POSITIVE = ["wonderful", "kind", "bright", "great", "lovely", "friendly", "beautiful", "calm", "clean", "happy",
            "warm", "gentle", "brilliant", "charming", "pleasant", "cheerful", "fresh", "delightful", "good", "nice"]
NEGATIVE = ["terrible", "rude", "dull", "awful", "ugly", "noisy", "dirty", "sad", "cold", "harsh", "boring",
            "gloomy", "nasty", "grim", "bad", "poor", "stale", "dreadful", "broken", "bleak"]
PROMPTS = ["Tell me about {t}.", "What do you think of {t}?", "Describe {t}.", "How is {t}?"]
RESPONSES = ["{T} is {a} and {b}.", "I think {t} is {a}.", "{T} feels {a}, truly {b}.", "{T} is very {a} today.",
             "Honestly, {t} is {a} and {b}."]

_POS = re.compile(r"\b(" + "|".join(POSITIVE) + r")\b", re.I)
_NEG = re.compile(r"\b(" + "|".join(NEGATIVE) + r")\b", re.I)


def gold_score(response: str) -> float:
    """Positivity in [-1, 1]: (#positive - #negative) / max(1, #positive + #negative)."""
    p, n = len(_POS.findall(response)), len(_NEG.findall(response))
    return (p - n) / max(1, p + n)


def is_positive(response: str) -> bool:
    return gold_score(response) > 0


def positivity_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Rule-based reward, usable as `reward_fn: rlhf_dist.demo:positivity_reward`."""
    return [gold_score(r) for r in responses]


def _response(rng: random.Random, topic: str, words: list[str]) -> str:
    a, b = rng.sample(words, 2)
    return rng.choice(RESPONSES).format(t=topic, T=topic[0].upper() + topic[1:], a=a, b=b)


def _prompt(rng: random.Random, topic: str) -> str:
    return rng.choice(PROMPTS).format(t=topic)


def _write(path: Path, rows: list) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def generate_demo_data(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write sft.jsonl, prefs.jsonl, prompts.jsonl and eval.jsonl (seeded, deterministic)."""
    rng = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_topics = [t for t in TOPICS if t not in EVAL_TOPICS]
    sft = []
    for i in range(1200):
        topic = rng.choice(TOPICS)
        prompt = _prompt(rng, topic)
        response = _response(rng, topic, POSITIVE if i % 2 == 0 else NEGATIVE)
        if rng.random() < 0.25:
            sft.append({"prompt": prompt, "response": response})
        else:
            sft.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]})
    prefs = []
    for _ in range(1200):
        topic = rng.choice(TOPICS)
        row = {"prompt": _prompt(rng, topic), "chosen": _response(rng, topic, POSITIVE),
               "rejected": _response(rng, topic, NEGATIVE)}
        if rng.random() < 0.2:
            row["margin"] = 1.0
        prefs.append(row)
    prompts: list = []
    for _ in range(400):
        p = _prompt(rng, rng.choice(train_topics))
        prompts.append(p if rng.random() < 0.1 else {"prompt": p})
    evals = []
    for _ in range(100):
        topic = rng.choice(EVAL_TOPICS)
        evals.append({"prompt": _prompt(rng, topic), "response": _response(rng, topic, POSITIVE)})
    paths = {"sft": out / "sft.jsonl", "prefs": out / "prefs.jsonl", "prompts": out / "prompts.jsonl",
             "eval": out / "eval.jsonl"}
    for key, rows in (("sft", sft), ("prefs", prefs), ("prompts", prompts), ("eval", evals)):
        _write(paths[key], rows)
    return paths
