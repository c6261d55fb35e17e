"""Loading a config: YAML or JSON (or a dict), dotted key=value overrides, strict conversion with errors
naming the field, then the cross-field checks. Also the redaction of secrets."""

from __future__ import annotations

import difflib
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

from .schema import ConfigError, RLHFConfig


class _Loader(yaml.SafeLoader):
    """safe_load, plus YAML 1.2's floats: YAML 1.1 reads `1e-4` and `2E5` (no dot, unsigned exponent) as
    strings, which a strict conversion would then refuse for a float field."""


# Added after the int resolver, so it only sees what 1.1's float and int patterns left as strings.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: as safe as safe_load


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = d.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{key}: '{p}' is not a group of fields")
        d = nxt
    d[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["ppo_epochs=2", "wandb.mode=offline"]` -> nested dict. Values parse as YAML scalars."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value")
        _set_dotted(out, key.strip(), _yaml(raw) if raw != "" else "")
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if p.suffix == ".json" else _yaml(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{p}: cannot parse: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of field: value")
    return data


def _members(tp: Any) -> tuple:
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


def _allowed_values(field: str) -> list[str]:
    """The values a Literal (or Literal | bool) field accepts, e.g. bf16 -> [auto, true, false]."""
    tp: Any = RLHFConfig
    for part in field.split("."):
        if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
            tp = typing.get_type_hints(tp).get(part)
        else:  # an item of a list field, e.g. stages.1
            tp = next((typing.get_args(a)[0] for a in _members(tp) if typing.get_origin(a) is list), None)
        if tp is None:
            return []
    out: list[str] = []
    for a in _members(tp):
        if a is bool:
            out += ["true", "false"]
        elif typing.get_origin(a) is Literal:
            out += [str(v) for v in typing.get_args(a)]
    return out


def _nearest(group: str, name: str) -> str:
    """"; did you mean `x`?" for the closest field of `group` (a dotted struct path, or the top level)."""
    cls: Any = RLHFConfig
    for part in group.split(".") if group else ():
        cls = typing.get_type_hints(cls).get(part, cls)
    close = difflib.get_close_matches(name, getattr(cls, "__struct_fields__", ()), n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


def _convert_error(e: msgspec.ValidationError) -> ConfigError:
    # msgspec says "... - at `$.roles.policy.num_gpus`"; turn the path into the field name first.
    msg, group = str(e), ""
    m = re.search(r" - at `\$\.?(.*)`$", msg)
    if m:
        field = re.sub(r"\[(\d+)\]", r".\1", m.group(1)) or "(top level)"
        msg, group = f"{field}: {msg[: m.start()]}", field
        allowed = _allowed_values(field) if msg.startswith(f"{field}: Invalid enum value") else []
        if allowed:  # e.g. bf16: "true" quoted in YAML is a string, not the bool
            msg += f", expected one of: {', '.join(allowed)}"
    m = re.search(r"Object contains unknown field `(\w+)`", msg)
    if m:
        msg = msg.replace(m.group(0), f"unknown field `{m.group(1)}`{_nearest(group, m.group(1))}")
    m = re.match(r"Object missing required field `(\w+)`", msg)
    if m:
        msg = f"{m.group(1)}: required field is missing"
    return ConfigError(f"invalid config: {msg}")


def load_config(source: "str | os.PathLike | dict | RLHFConfig", overrides: list[str] | None = None) -> RLHFConfig:
    """Build a checked RLHFConfig from a YAML/JSON path, a dict or a config, plus key=value overrides."""
    if isinstance(source, RLHFConfig):
        data = source.to_dict()
    elif isinstance(source, dict):
        data = source
    else:
        data = read_config_file(source)
    if overrides:
        data = _merge(data, parse_overrides(overrides))
    try:
        # strict: "2" is not an int nor 1 a bool (an int still fills a float field).
        cfg = msgspec.convert(data, RLHFConfig, strict=True)
    except msgspec.ValidationError as e:
        raise _convert_error(e) from None
    return cfg.check()


# Environment variables whose values must never reach a snapshot, a log line or W&B.
_SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.I)


def secret_values() -> list[str]:
    return [v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= 6]


def redact(obj: Any, secrets: list[str] | None = None) -> Any:
    """Replace any occurrence of a secret from the environment in strings of a nested structure."""
    secrets = secret_values() if secrets is None else secrets
    if not secrets:
        return obj
    if isinstance(obj, str):
        for s in secrets:
            obj = obj.replace(s, "***")
        return obj
    if isinstance(obj, dict):
        return {k: redact(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v, secrets) for v in obj]
    return obj
