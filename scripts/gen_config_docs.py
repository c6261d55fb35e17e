"""Write docs/config.md from RLHFConfig's fields and docstrings (the schema is the only source).

    python scripts/gen_config_docs.py          # rewrite docs/config.md
    python scripts/gen_config_docs.py --check  # exit 1 if docs/config.md is stale (run by the tests)
"""

import sys
from pathlib import Path

from rlhf_dist.config import field_docs

OUT = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def render() -> str:
    lines = ["# Config reference", "",
             "Generated from `rlhf_dist/config/schema.py` by `scripts/gen_config_docs.py`; do not edit by hand.",
             "Every field can be set in the YAML/JSON file or on the command line as `key=value`",
             "(dotted for groups: `roles.policy.num_gpus=1`, `wandb.mode=offline`).", "",
             "| field | type | default | meaning |", "|---|---|---|---|"]
    for name, typ, default, doc in field_docs():
        typ = typ.replace(' | ', ' or ')
        lines.append(f"| `{name}` | `{typ}` | `{default}` | {doc.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if OUT.is_file() and OUT.read_text() == text else 1)
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT}")
