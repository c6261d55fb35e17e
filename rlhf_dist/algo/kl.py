"""The KL term: single-sample estimators of KL(pi || ref) and the fixed and adaptive coefficients."""

from __future__ import annotations

from typing import NamedTuple

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(
    logp: torch.Tensor,  # (B, T) log pi(token), tokens sampled from pi
    ref_logp: torch.Tensor,  # (B, T) log ref(token) for the same tokens
    estimator: str,
) -> torch.Tensor:  # (B, T) per-token estimate of KL(pi || ref)
    """Single-sample estimators of KL(pi || ref) from http://joschu.net/blog/kl-approx.html, with
    log r = ref_logp - logp, x ~ pi:
    - "k1": -log r. Its mean is the KL (unbiased value), with high variance; negative on some tokens.
    - "k2": (log r)^2 / 2. Biased as a value, low variance.
    - "k3": (r - 1) - log r. Its mean is the KL too, always >= 0, lower variance than k1.

    An unbiased *value* is not an unbiased *gradient*, which is what matters for training (Tang & Munos
    2025, arXiv:2506.09477; Liu et al. 2025, arXiv:2510.01555):
    - as a penalty in the reward (`kl_in: reward`, a detached term the policy gradient multiplies with
      grad log pi), k1 gives exactly the gradient of KL(pi || ref); so the reward uses k1;
    - as a loss term differentiated directly (`kl_in: loss`), k1 has zero expected gradient; k2's gradient
      is the reverse KL's on-policy; k3's (GRPO's choice) is a low-variance, first-order approximation of it
      (its expectation is the gradient of the forward KL(ref || pi)). So the loss takes k2 or k3.
    k3 grows like exp(log r): an extreme ref/pi gap gives a large value.
    """
    log_r = ref_logp - logp
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r ** 2
    if estimator == "k3":
        # expm1 keeps precision when r is close to 1, where (r - 1) and log r nearly cancel.
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {', '.join(KL_ESTIMATORS)}")


def kl_estimator_for(kl_in: str, estimator: str | None) -> str:
    """The estimator to use: as given, else k1 in the reward and k3 in the loss (see `kl_penalty`)."""
    return estimator or ("k1" if kl_in == "reward" else "k3")


class KLPlacement(NamedTuple):
    """Where the KL to the reference enters the objective: exactly one of the two weights is the coefficient."""

    reward_coef: float  # weight of the per-token penalty in the token rewards (kl_in: reward), else 0
    loss_coef: float  # weight of the KL term in the policy loss (kl_in: loss), else 0
    estimator: str  # k1 | k2 | k3, for both the logged KL and the term itself (`kl_estimator_for`)


def kl_placement(kl_in: str, kl_coef: float, estimator: str | None = None) -> KLPlacement:
    """The one decision of where the KL goes, read by the advantages phase (`reward_coef`) and by the policy
    learner (`loss_coef`), so the term can never enter twice or not at all."""
    if kl_in not in ("reward", "loss"):
        raise ValueError(f"unknown kl_in {kl_in!r}; expected reward or loss")
    in_reward = kl_in == "reward"
    return KLPlacement(kl_coef if in_reward else 0.0, 0.0 if in_reward else kl_coef, kl_estimator_for(kl_in, estimator))


class FixedKLController:
    """A constant KL coefficient. Same interface as AdaptiveKLController."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient never changes."""

    def state_dict(self) -> dict:
        return {"value": float(self.value)}

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d["value"])


class AdaptiveKLController:
    """Proportional controller that steers the observed KL towards `target`.

    Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", arXiv:1909.08593,
    sec. 2.2: e_t = clip(KL_t / target - 1, -0.2, 0.2); beta <- beta * (1 + K_beta * e_t) with
    K_beta = n_steps / horizon. The clip bounds each update to +-20% (times n_steps/horizon) so one
    noisy KL measurement cannot swing the coefficient.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0:
            raise ValueError(f"AdaptiveKLController target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"AdaptiveKLController horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """`current_kl`: the batch's mean per-sequence KL; `n_steps`: samples (or steps) since the
        last update, in the same unit as `horizon`."""
        err = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict:
        # Plain Python numbers so the dict can be written with json.dump.
        return {"value": float(self.value), "target": float(self.target), "horizon": int(self.horizon)}

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d["value"])
        self.target = float(d["target"])
        self.horizon = int(d["horizon"])
