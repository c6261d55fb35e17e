"""The safety filter (`safety_filter`): for each response, whether it is flagged and why.

Either a rule file, one rule per line: a literal word or phrase, or `re:PATTERN`, each matched case-insensitively
as a whole (not inside a longer word: no word character right before or after the match); blank lines and lines
starting with `#` are skipped. Or a classifier, `module:function(prompts, responses) -> [(flagged, reason), ...]`.
PPO penalises or drops flagged rollouts (`online/safety.py`); `rlhf-dist eval` reports the flagged rate.
No torch here.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..config import ConfigError


@dataclass(frozen=True)
class Verdict:
    flagged: bool
    reason: str  # the rule (or the classifier's reason) that flagged it; "" when not flagged


SafetyFilter = Callable[[list[str], list[str]], list[Verdict]]  # (prompts, responses) -> one verdict each


def is_classifier(spec: str) -> bool:
    """`module:function`, as opposed to a rule file's path (a path with a ':' that exists is a file)."""
    return re.fullmatch(r"[\w.]+:\w+", spec) is not None and not Path(spec).exists()


def load_safety_filter(spec: str) -> SafetyFilter:
    """The filter a `safety_filter` value names; a bad rule file or an unimportable classifier is a
    ConfigError naming `file:line` or the function."""
    if is_classifier(spec):
        return _classifier(spec)
    rules = parse_rules(spec)
    return lambda prompts, responses: [match_rules(rules, r) for r in responses]


def parse_rules(path: str) -> list[tuple[str, re.Pattern]]:
    """(rule as written, its compiled pattern) for each rule line of `path`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"safety_filter: rule file {path} not found (or module:function for a classifier)")
    rules = []
    for lineno, raw in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pattern = line[3:].strip() if line.startswith("re:") else re.escape(line)
        if not pattern:
            raise ConfigError(f"{p.name}:{lineno}: empty pattern after 're:'")
        try:
            re.compile(pattern)  # alone first, so that an error's position is the user's
        except re.error as e:
            raise ConfigError(f"{p.name}:{lineno}: bad regular expression {pattern!r}: {e}") from None
        # Lookarounds, not \b: a phrase that starts or ends with punctuation still matches as a whole.
        rules.append((line, re.compile(rf"(?<!\w)(?:{pattern})(?!\w)", re.IGNORECASE)))
    if not rules:
        raise ConfigError(f"safety_filter: {p.name} has no rules (only blank lines and comments)")
    return rules


def match_rules(rules: list[tuple[str, re.Pattern]], response: str) -> Verdict:
    """Flagged by the first rule that matches, named in the reason with the text it matched."""
    for rule, pattern in rules:
        m = pattern.search(response)
        if m:
            return Verdict(True, f"rule {rule!r} matched {m.group(0)!r}")
    return Verdict(False, "")


def _classifier(spec: str) -> SafetyFilter:
    mod, name = spec.split(":")
    try:
        fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"safety_filter: cannot load {spec}: {e}") from None

    def run(prompts: list[str], responses: list[str]) -> list[Verdict]:
        out = list(fn(prompts, responses))
        if len(out) != len(responses):
            raise ValueError(f"safety_filter {spec} returned {len(out)} verdicts for {len(responses)} responses")
        if not all(isinstance(v, (tuple, list)) and len(v) == 2 and isinstance(v[0], bool) for v in out):
            raise ValueError(f"safety_filter {spec} must return (flagged: bool, reason: str) per response")
        return [Verdict(f, str(why) if f else "") for f, why in out]

    return run


def flagged_rate(verdicts: list[Verdict]) -> float:
    return sum(v.flagged for v in verdicts) / max(len(verdicts), 1)
