"""The RLHF arithmetic as small pure-torch functions: tensors and floats in, tensors out. Nothing here
knows about configs, Ray or DeepSpeed, so every formula is unit-tested on a CPU with hand-worked numbers.

- `stats`: masked statistics, log-probs and entropy from logits, running moments;
- `kl`: KL estimators (k1, k2, k3) and the fixed / adaptive coefficients;
- `advantages`: reward shaping, GAE, GRPO, RLOO, REINFORCE++;
- `losses`: PPO's policy and value losses, loss aggregation, the ranking, DPO and KTO losses;
- `rewards`: reward outcomes (ok, timeout, error), combining weighted sources, the samples a failure drops;
- `safety`: what the safety filter's verdicts do to a batch (a score penalty, or dropped rollouts).
"""

from .advantages import (  # noqa: F401
                         advantages_for,
                         broadcast_to_tokens,
                         compute_gae,
                         group_baseline,
                         grpo_advantages,
                         reinforce_pp_advantages,
                         reward_to_go,
                         rloo_advantages,
                         shape_rewards,
)
from .kl import (  # noqa: F401
                 KL_ESTIMATORS,
                 AdaptiveKLController,
                 FixedKLController,
                 KLPlacement,
                 kl_estimator_for,
                 kl_penalty,
                 kl_placement,
)
from .losses import (  # noqa: F401
                         LOSS_AGG,
                         aggregate_loss,
                         dpo_loss,
                         kto_loss,
                         loss_units,
                         pairwise_ranking_loss,
                         ppo_policy_loss,
                         ppo_value_loss,
)
from .rewards import (  # noqa: F401
                         Outcome,
                         combine_scores,
                         kept_samples,
                         outcome_counts,
)
from .safety import safety_adjust  # noqa: F401
from .stats import (  # noqa: F401
                         RunningMoments,
                         chunked_logprobs,
                         entropy_from_logits,
                         logprobs_from_logits,
                         masked_mean,
                         masked_sum,
                         masked_var,
                         masked_whiten,
                         response_lengths,
)
