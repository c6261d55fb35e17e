"""Write docs/config.md from RLHFConfig's fields and docstrings (the schema is the only source), grouped by
stage and algorithm as `rlhf_dist.config.docs.sections` derives from the stage and algorithm tables.

    python scripts/gen_config_docs.py          # rewrite docs/config.md
    python scripts/gen_config_docs.py --check  # exit 1 if docs/config.md is stale (run by the tests)
"""

import re
import sys
from pathlib import Path

from rlhf_dist.config.docs import FieldDoc, Section, sections

OUT = Path(__file__).resolve().parent.parent / "docs" / "config.md"
HEAD = """# Config reference

Generated from `rlhf_dist/config/schema.py` by `scripts/gen_config_docs.py`; do not edit by hand.
Every field can be set in the YAML/JSON file or on the command line as `key=value`
(dotted for groups: `roles.policy.num_gpus=1`, `wandb.mode=offline`). Relative paths are relative to the
working directory. "allowed" is what loading checks: a value outside it, a wrong type or an unknown key is an
error naming the field (an int fills a float field; nothing else converts). Cross-field rules (e.g.
`ppo_batch_size` x `n_samples_per_prompt` a multiple of `ppo_mini_batch_size`) are checked after loading.
Examples of whole configs: [configs/examples/](../configs/examples/)."""


def anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def table(rows: list[FieldDoc]) -> list[str]:
    lines = ["| field | allowed | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{r.name}` | {r.type} | `{r.default}` | {r.doc.replace('|', '/')} |"
              for r in rows]
    return lines + [""]


def only_with(algo: str) -> str:
    return f"Only with `algorithm: {algo}`"


def render_section(s: Section) -> list[str]:
    lines = [f"## {s.title}", ""] + ([s.intro, ""] if s.intro else []) + table(s.rows)
    for algo, rows in s.by_algorithm.items():
        lines += [f"### {only_with(algo)}", ""] + table(rows)
    return lines


def contents(s: Section) -> list[str]:
    return ([f"- [{s.title}](#{anchor(s.title)})" + (f" — {s.intro}" if s.intro else "")]
            + [f"  - [{only_with(a)}](#{anchor(only_with(a))})" for a in s.by_algorithm])


def render() -> str:
    secs = sections()
    toc = [line for s in secs for line in contents(s)]
    body = [line for s in secs for line in render_section(s)]
    return "\n".join([HEAD, "", *toc, "", *body]).rstrip() + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if OUT.is_file() and OUT.read_text() == text else 1)
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT}")
