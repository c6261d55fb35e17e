"""What docs/config.md is made of (scripts/gen_config_docs.py renders it): every field's allowed values, default
and docstring, read from the schema, and the section it belongs in, derived from the stage and algorithm tables.

A field's section, first match wins:
1. a field of a group struct (`roles.*`, `wandb.*`, ...): the group's own section;
2. a field only one online algorithm reads (its row's `own_fields`, a `<algorithm>_` prefix, or a critic field
   for the algorithms that start a critic): that algorithm's part of the online stage;
3. a field under a schema section comment that names a stage (`# --- SFT ---`): that stage;
4. a `<stage>_` prefix (but not a stage's own `given_by` model path, which stays with the models): that stage;
5. otherwise the schema section comment it sits under (`# --- data handling ---`).
So a new stage's `kto_*` fields, a new `<stage>_*_field`, or a field put under an existing section are placed
without touching the generator.
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from dataclasses import dataclass, field

import msgspec

from .algorithms import ALGORITHMS, Algorithm
from .checks import CRITIC_FIELDS
from .schema import RLHFConfig
from .stages import STAGES, Stage

_SECTION = re.compile(r"^    # --- (.+?) -*$")
_FIELD = re.compile(r"^    (\w+):")


class FieldDoc(typing.NamedTuple):
    name: str  # dotted for a group's field: roles.policy.num_gpus
    type: str  # the allowed values, as validated: "int >= 1", "float in [0, 1]", "auto / cpu / cuda"
    default: str  # JSON, or "required"
    doc: str  # the docstring on one line


def allowed(hint: typing.Any) -> str:
    """The values a type hint accepts, in words, with the bounds msgspec checks: `float in [0, 1)`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        base, *metas = args
        meta = next((m for m in metas if isinstance(m, msgspec.Meta)), None)
        return allowed(base) + (_bounds(meta, base is int) if meta else "")
    if origin is typing.Literal:
        return " / ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(allowed(a) for a in args)
    if origin is list:
        return f"list of {allowed(args[0])}"
    if origin is dict:
        return f"map of {allowed(args[0])} to {allowed(args[1])}"
    return "null" if hint is type(None) else hint.__name__


def _bounds(meta: msgspec.Meta, integer: bool) -> str:
    ge, gt, le, lt = meta.ge, meta.gt, meta.le, meta.lt
    if integer:  # int > 0 reads better as int >= 1
        ge, gt = (gt + 1, None) if gt is not None else (ge, gt)
        le, lt = (lt - 1, None) if lt is not None else (le, lt)
    lo = f"[{ge:g}" if ge is not None else f"({gt:g}" if gt is not None else None
    hi = f"{le:g}]" if le is not None else f"{lt:g})" if lt is not None else None
    if lo and hi:
        return f" in {lo}, {hi}"
    if lo:
        return f" {'>=' if ge is not None else '>'} {lo[1:]}"
    return f" {'<=' if le is not None else '<'} {hi[:-1]}" if hi else ""


def field_docs() -> list[FieldDoc]:
    """Every field of the schema, in declaration order, groups' fields dotted."""
    rows: list[FieldDoc] = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls, include_extras=True)
        docs = dict(re.findall(r"\n    (\w+):[^\n]*\n    \"\"\"(.*?)\"\"\"", inspect.getsource(cls), re.S))
        defaults = cls(**({"model_name": "x"} if cls is RLHFConfig else {}))
        for name in cls.__struct_fields__:
            default = getattr(defaults, name)
            if isinstance(default, msgspec.Struct):
                walk(type(default), f"{prefix}{name}.")
                continue
            rows.append(FieldDoc(prefix + name, allowed(hints[name]),
                                 "required" if name == "model_name" else json.dumps(default),
                                 " ".join(docs.get(name, "").split())))

    walk(RLHFConfig, "")
    return rows


def schema_sections() -> dict[str, str]:
    """{top-level field: the `# --- ... ---` comment it sits under in schema.py} ("" before the first)."""
    out, current = {}, ""
    for line in inspect.getsource(RLHFConfig).splitlines():
        if m := _SECTION.match(line):
            current = m.group(1).strip()
        elif m := _FIELD.match(line):
            out[m.group(1)] = current
    return out


def _names_stage(comment: str, stages: dict[str, Stage]) -> str | None:
    words = set(re.findall(r"\w+", comment.lower()))
    return next((s for s in stages if s in words), None)


def section_of(name: str, comment: str, stages: dict[str, Stage] = STAGES,
               algorithms: dict[str, Algorithm] = ALGORITHMS,
               critic_fields: tuple[str, ...] = CRITIC_FIELDS) -> tuple[str, str | None]:
    """(section, algorithm or None) of field `name` (dotted for a group) sitting under schema comment `comment`:
    the section is `stage:<name>`, `group:<name>` or the comment itself (the rules in the module docstring)."""
    top = name.split(".")[0]
    if "." in name:
        return f"group:{top}", None
    online = next(s for s in stages.values() if not s.offline)
    for a in algorithms.values():
        if (name in a.own_fields or (a.name not in stages and name.startswith(a.name + "_"))
                or (a.critic and name in critic_fields)):
            return f"stage:{online.name}", a.name
    if stage := _names_stage(comment, stages):
        return f"stage:{stage}", None
    given = {s.given_by for s in stages.values()}
    for s in stages.values():
        if name.startswith(s.name + "_") and name not in given:
            return f"stage:{s.name}", None
    return comment, None


@dataclass
class Section:
    key: str  # "stage:sft", "group:wandb" or a schema comment
    title: str
    intro: str
    rows: list[FieldDoc] = field(default_factory=list)
    by_algorithm: dict[str, list[FieldDoc]] = field(default_factory=dict)  # the online stage's algorithm-only rows


def sections() -> list[Section]:
    """The config reference's sections, in the order the schema declares their first field (an algorithm-only
    field declared early, such as critic_model_path, does not pull the online stage forward)."""
    comments, out, first = schema_sections(), {}, {}
    structs = {n: type(getattr(RLHFConfig(model_name="x"), n)) for n in RLHFConfig.__struct_fields__}
    for i, row in enumerate(field_docs()):
        key, algo = section_of(row.name, comments.get(row.name.split(".")[0], ""))
        if key not in out:
            out[key] = _section(key, structs)
        sec = out[key]
        if algo is None:
            first.setdefault(key, i)
            sec.rows.append(row)
        else:
            sec.by_algorithm.setdefault(algo, []).append(row)
    return sorted(out.values(), key=lambda s: first.get(s.key, len(first)))


def _section(key: str, structs: dict[str, type]) -> Section:
    kind, _, name = key.partition(":")
    if kind == "stage":
        stage = STAGES[name]
        return Section(key, f"Stage `{name}`", f"{stage.help[0].upper()}{stage.help[1:]}.")
    if kind == "group":
        doc = " ".join((structs[name].__doc__ or "").split())
        return Section(key, f"`{name}.*`", doc)
    return Section(key, key[:1].upper() + key[1:], "")
