"""What the learner optimises: the KL's placement and estimator (`algo.kl_placement`, `algo.kl_estimator_for`),
the advantages phase (`online.experience.make_experience` over `algo.advantages_for`) for every algorithm x
kl_in x normalisation, and the KL term the policy learner adds to its loss (`roles.learner.Learner`), each
against values worked out by hand.

One prompt, three samples (n = 3), responses of 3, 2 and 1 tokens; gamma 1, GAE lambda 0.5, KL coefficient 0.1.
log r = log ref - log pi on the valid tokens: row 0 (-1, 0, 0), row 1 (0, 1), row 2 (1), so per token
k1 = -log r: (1, 0, 0), (0, -1), (-1); k2 = (log r)^2 / 2: (.5, 0, 0), (0, .5), (.5);
k3 = e^log r - 1 - log r: (1/e, 0, 0), (0, e - 2), (e - 2). Scores (1, 3, 2); PPO values (.5, .5, .5), (1, 1), (2).
"""

import math
import statistics
from types import SimpleNamespace

import msgspec
import pytest
import torch

from rlhf_dist.algo import kl_estimator_for, kl_placement
from rlhf_dist.config import load_config
from rlhf_dist.online.experience import make_experience

BETA, E = 0.1, math.e
MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])  # (B, R)
OLD = torch.full((3, 3), -1.0)  # (B, R) log pi of the sampled tokens
LOG_R = torch.tensor([[-1.0, 0.0, 0.0], [0.0, 1.0, 8.0], [1.0, 5.0, 5.0]])  # (B, R): junk past each response
SCORES = torch.tensor([1.0, 3.0, 2.0])  # (B,)
VALUES = torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 9.0], [2.0, 9.0, 9.0]])  # (B, R)

K1 = [[1, 0, 0], [0, -1, 0], [-1, 0, 0]]
K2 = [[0.5, 0, 0], [0, 0.5, 0], [0.5, 0, 0]]
K3 = [[1 / E, 0, 0], [0, E - 2, 0], [E - 2, 0, 0]]

# Token rewards: -0.1 x k1 on each token, plus the score on the last one (kl_in: reward); the score alone (loss).
REWARDS = {"reward": [[-0.1, 0, 1.0], [0, 3.1, 0], [2.1, 0, 0]], "loss": [[0, 0, 1.0], [0, 3.0, 0], [2.0, 0, 0]]}
RTG = {"reward": [[0.9, 1.0, 1.0], [3.1, 3.1, 0], [2.1, 0, 0]], "loss": [[1.0, 1.0, 1.0], [3.0, 3.0, 0], [2.0, 0, 0]]}
# Each sequence's score less its summed KL penalty (critic-free): 1 - .1, 3 + .1, 2 + .1; or the scores alone.
SEQ = {"reward": [0.9, 3.1, 2.1], "loss": [1.0, 3.0, 2.0]}

# What the advantages phase returns per algorithm, before the normalisation a case may switch off:
# (rewards, advantages, returns).
HAND = {
    # GAE, delta_t = r_t + V_{t+1} - V_t, A_t = delta_t + 0.5 A_{t+1}; returns A + V.
    # reward: row 0 deltas (-.1, 0, .5) -> A (.025, .25, .5); row 1 (0, 2.1) -> (1.05, 2.1); row 2 (.1).
    # loss:   row 0 deltas (0, 0, .5) -> A (.125, .25, .5); row 1 (0, 2) -> (1, 2); row 2 (0).
    ("ppo", "reward"): (REWARDS["reward"], [[0.025, 0.25, 0.5], [1.05, 2.1, 0], [0.1, 0, 0]],
                        [[0.525, 0.75, 1.0], [2.05, 3.1, 0], [2.1, 0, 0]]),
    ("ppo", "loss"): (REWARDS["loss"], [[0.125, 0.25, 0.5], [1.0, 2.0, 0], [0.0, 0, 0]],
                      [[0.625, 0.75, 1.0], [2.0, 3.0, 0], [2.0, 0, 0]]),
    # GRPO: the sequence value less the group mean (61/30 with the KL, 2 without), on every token.
    ("grpo", "reward"): (REWARDS["reward"], [[x - 61 / 30] * 3 for x in SEQ["reward"]], RTG["reward"]),
    ("grpo", "loss"): (REWARDS["loss"], [[x - 2.0] * 3 for x in SEQ["loss"]], RTG["loss"]),
    # RLOO: less the mean of the other two: .9 - 2.6, 3.1 - 1.5, 2.1 - 2; without the KL 1 - 2.5, 3 - 1.5, 2 - 2.
    ("rloo", "reward"): (REWARDS["reward"], [[-1.7] * 3, [1.6] * 3, [0.1] * 3], RTG["reward"]),
    ("rloo", "loss"): (REWARDS["loss"], [[-1.5] * 3, [1.5] * 3, [0.0] * 3], RTG["loss"]),
    # REINFORCE++: the scores less their group mean (-1, 1, 0) shaped as above; advantages the returns-to-go.
    ("reinforce_pp", "reward"): ([[-0.1, 0, -1.0], [0, 1.1, 0], [0.1, 0, 0]],
                                 [[-1.1, -1.0, -1.0], [1.1, 1.1, 0], [0.1, 0, 0]],
                                 [[-1.1, -1.0, -1.0], [1.1, 1.1, 0], [0.1, 0, 0]]),
    ("reinforce_pp", "loss"): ([[0, 0, -1.0], [0, 1.0, 0], [0, 0, 0]], [[-1.0, -1.0, -1.0], [1.0, 1.0, 0], [0, 0, 0]],
                               [[-1.0, -1.0, -1.0], [1.0, 1.0, 0], [0, 0, 0]]),
}


def _whiten(table: list[list[float]]) -> list[list[float]]:
    """Over the valid tokens of the batch: (x - mean) / unbiased std (sqrt(var + 1e-8)); 0 on padding."""
    valid = [x for row, m in zip(table, MASK.tolist()) for x, v in zip(row, m) if v]
    mean, var = statistics.mean(valid), statistics.variance(valid)
    return [[(x - mean) / math.sqrt(var + 1e-8) if v else 0.0 for x, v in zip(row, m)]
            for row, m in zip(table, MASK.tolist())]


def _by_group_std(table: list[list[float]], kl_in: str) -> list[list[float]]:
    """GRPO's division by the group's unbiased std (+ 1e-6) of the sequence values."""
    std = statistics.stdev(SEQ[kl_in])
    return [[x / (std + 1e-6) for x in row] for row in table]


def _experience(algorithm: str, kl_in: str, estimator: str | None = None, **options):
    cfg = load_config({"model_name": "x", "algorithm": algorithm, "n_samples_per_prompt": 3, "kl_in": kl_in,
                       "kl_estimator": estimator, "ppo_gamma": 1.0,
                       **({"ppo_lam": 0.5} if algorithm == "ppo" else {}), **options})
    samples = SimpleNamespace(action_mask=MASK, sequences=None, attention_mask=None, prompt_len=2,
                              sample_ids=[0, 1, 2], version=0)
    values = VALUES if algorithm == "ppo" else None  # critic-free algorithms pass none
    return make_experience(samples, OLD, OLD + LOG_R, values, SCORES, cfg, BETA)


def _close(got: torch.Tensor, want: list[list[float]]) -> None:
    torch.testing.assert_close(got, torch.tensor(want, dtype=got.dtype) * MASK, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kl_in", ["reward", "loss"])
@pytest.mark.parametrize("algorithm, options, normalise", [
    ("ppo", {"ppo_whiten_advantages": True}, _whiten),
    ("ppo", {"ppo_whiten_advantages": False}, None),
    ("grpo", {"grpo_norm_std": True}, _by_group_std),
    ("grpo", {"grpo_norm_std": False}, None),  # Dr. GRPO
    ("rloo", {}, None),  # no normalisation option
    ("reinforce_pp", {}, _whiten),  # always normalised over the batch
], ids=["ppo-whiten", "ppo-raw", "grpo-std", "grpo-raw", "rloo", "reinforce_pp"])
def test_the_advantages_phase_by_hand(algorithm, options, normalise, kl_in):
    exp = _experience(algorithm, kl_in, **options)
    rewards, advantages, returns = HAND[algorithm, kl_in]
    if normalise is _whiten:
        advantages = _whiten(advantages)
    elif normalise is _by_group_std:
        advantages = _by_group_std(advantages, kl_in)
    _close(exp.rewards, rewards)
    _close(exp.advantages, advantages)
    _close(exp.returns, returns)


def test_the_default_estimators_and_where_the_kl_goes():
    """k1 in the reward, k3 in the loss unless the config names one; the coefficient goes to exactly one place."""
    assert (kl_estimator_for("reward", None), kl_estimator_for("loss", None)) == ("k1", "k3")
    assert kl_estimator_for("loss", "k2") == "k2" and kl_estimator_for("reward", "k1") == "k1"
    assert kl_placement("reward", BETA) == (BETA, 0.0, "k1")
    assert kl_placement("loss", BETA) == (0.0, BETA, "k3")
    assert kl_placement("loss", BETA, "k2") == (0.0, BETA, "k2")
    with pytest.raises(ValueError, match="kl_in"):
        kl_placement("both", BETA)


@pytest.mark.parametrize("kl_in, estimator, want", [
    ("reward", None, K1), ("reward", "k1", K1), ("loss", None, K3), ("loss", "k3", K3), ("loss", "k2", K2),
])
def test_the_experience_kl_uses_the_configured_estimator(kl_in, estimator, want):
    """The per-token KL of the experience (logged, and shaped into the rewards with kl_in: reward)."""
    exp = _experience("ppo", kl_in, estimator)
    _close(exp.kl, want)
    if kl_in == "loss":  # the KL is the learner's: the rewards are the scores alone, whatever the estimator
        _close(exp.rewards, REWARDS["loss"])


def _policy_batch(model, prompt_len: int = 4):
    """Two sampled sequences (the second response one token shorter) for the tiny policy `model`, with old
    logprobs its own (ratio 1), advantages 0 (no surrogate loss) and log r = -1 on every response token."""
    from rlhf_dist.steps.forwards import response_logprobs
    from rlhf_dist.steps.records import Experience

    seq = torch.randint(3, model.config.vocab_size, (2, prompt_len + 3), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(seq)  # (B, P+R)
    attn[1, -1:] = 0
    seq = seq * attn
    action = attn[:, prompt_len:]  # (B, R)
    with torch.no_grad():
        old = response_logprobs(model, seq, attn, prompt_len) * action  # (B, R)
    zeros = torch.zeros_like(old)
    return Experience(seq, attn, action, prompt_len, old, old - 1.0, zeros, torch.zeros(2), zeros, zeros, zeros,
                      zeros, [0, 1], 0)


@pytest.mark.usefixtures("drop_log_handlers")
def test_the_policy_learner_adds_the_kl_to_its_loss_only_with_kl_in_loss(tiny, tmp_path, gloo_group):
    """`Learner.micro_loss` with the driver's coefficient: with a zero surrogate, the loss is the KL term alone,
    0.1 x the estimate at log r = -1 (k1 1, k2 .5, k3 1/e), and only with kl_in: loss."""
    from conftest import base_config

    from rlhf_dist.roles.calls import free_port
    from rlhf_dist.roles.learner import Learner

    learner = Learner("policy", 0, 1, base_config(tiny, tmp_path, zero_stage=0), 2, "cpu")
    learner.setup("127.0.0.1", free_port(), str(tiny["model"]), total_steps=1)
    micro = _policy_batch(learner.engine.module)
    cfg = learner.cfg
    for kl_in, estimator, want in [("reward", None, 0.0), ("reward", "k1", 0.0), ("loss", None, BETA / E),
                                   ("loss", "k3", BETA / E), ("loss", "k2", BETA * 0.5)]:
        learner.cfg = msgspec.structs.replace(cfg, kl_in=kl_in, kl_estimator=estimator)
        loss, stats, _ = learner.micro_loss(micro, micro.action_mask, BETA)
        assert float(loss.detach()) == pytest.approx(want, abs=1e-6), (kl_in, estimator)
        assert ("kl_loss" in stats) == (kl_in == "loss"), (kl_in, estimator)
