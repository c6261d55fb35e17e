"""The config reference's data (rlhf_dist/config/docs.py): allowed values read from the schema's bounds, a
docstring on every field, and the grouping by stage and algorithm, including for fields added later."""

import dataclasses
from typing import Annotated, Literal

import msgspec
import pytest

from rlhf_dist.config.algorithms import ALGORITHMS, Algorithm
from rlhf_dist.config.docs import allowed, field_docs, section_of, sections
from rlhf_dist.config.schema import NonNegInt, PositiveFloat, PositiveInt, UnitFloat
from rlhf_dist.config.stages import STAGES


@pytest.mark.parametrize("hint, text", [
    (PositiveInt, "int >= 1"),
    (NonNegInt, "int >= 0"),
    (PositiveFloat, "float > 0"),
    (UnitFloat, "float in [0, 1]"),
    (Annotated[float, msgspec.Meta(ge=0, lt=1)], "float in [0, 1)"),
    (Annotated[float, msgspec.Meta(gt=0, le=1)] | None, "float in (0, 1] or null"),
    (Annotated[int, msgspec.Meta(ge=0, le=3)], "int in [0, 3]"),
    (Annotated[int, msgspec.Meta(lt=5)], "int <= 4"),
    (Literal["auto"] | bool, "auto or bool"),
    (list[str] | Literal["all-linear"], "list of str or all-linear"),
    (dict[str, float], "map of str to float"),
])
def test_allowed_values_follow_the_bounds(hint, text):
    assert allowed(hint) == text


def test_every_field_has_a_docstring_and_its_bounds():
    rows = {r.name: r for r in field_docs()}
    assert [n for n, r in rows.items() if not r.doc] == []
    assert rows["ppo_gamma"].type == "float in [0, 1]" and rows["zero_stage"].type == "int in [0, 3]"
    assert rows["model_name"].default == "required" and rows["kl_coef"].default == "0.05"


def test_sections_follow_the_stage_and_algorithm_tables():
    secs = {s.key: s for s in sections()}
    names = {k: {r.name for r in s.rows} for k, s in secs.items()}
    assert {"sft_lr", "sft_data_path"} <= names["stage:sft"]
    assert {"reward_lr", "freeze_reward_backbone"} <= names["stage:reward"]
    # reward_fn sits under the online section of the schema: PPO's reward, not the reward model's stage
    assert {"kl_coef", "reward_fn", "gen_top_p", "ppo_iterations"} <= names["stage:ppo"]
    assert "reward_model_path" in names["models and devices"]  # a stage's given_by stays with the models
    assert {r.name for r in secs["stage:ppo"].by_algorithm["grpo"]} == {"grpo_norm_std"}
    assert {"ppo_lam", "critic_init"} <= {r.name for r in secs["stage:ppo"].by_algorithm["ppo"]}
    assert "roles.policy.num_gpus" in names["group:roles"]
    every = [r.name for s in secs.values() for r in (*s.rows, *(r for rs in s.by_algorithm.values() for r in rs))]
    assert sorted(every) == sorted(r.name for r in field_docs())  # each field exactly once


def test_fields_added_later_are_grouped_without_edits():
    """A new stage's fields by its prefix, a new algorithm's by its prefix, a new field under an existing
    schema section by that section."""
    stages = {**STAGES, "kto": dataclasses.replace(STAGES["dpo"], name="kto", data_field="kto_data_path")}
    algos = {**ALGORITHMS, "remax": Algorithm("remax", "remax", critic=False)}
    at = lambda name, comment: section_of(name, comment, stages, algos)  # noqa: E731
    assert at("kto_beta", "outputs") == ("stage:kto", None)
    assert at("kto_beta", "KTO") == ("stage:kto", None)
    assert at("sft_prompt_field", "data handling") == ("stage:sft", None)
    assert at("prompt_field", "data handling") == ("data handling", None)
    assert at("reward_url", "online RL (the `ppo` stage, whatever the algorithm)") == ("stage:ppo", None)
    assert at("safety_threshold", "faults and health") == ("faults and health", None)
    assert at("remax_baseline", "online RL (the `ppo` stage)") == ("stage:ppo", "remax")
    assert at("safety.model", "outputs") == ("group:safety", None)
