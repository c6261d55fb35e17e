"""The schema: every field of a run, its type, its default and its docstring (the only home of each)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from .algorithms import ALGORITHMS
from .checks import config_errors
from .engines import ENGINES
from .stages import STAGES

PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]
UnitFloat = Annotated[float, msgspec.Meta(ge=0, le=1)]

# The attention and MLP projections of Llama, Mistral and Qwen2: lora_target_modules' default.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ConfigError(ValueError):
    """A config problem; the message names the field (e.g. `ppo_epochs: expected int, got str`)."""


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


class RoleResources(_Strict):
    """Devices of one role. Fractions share a device (e.g. 0.25 GPU each for 4 roles on 1 GPU)."""

    num_workers: PositiveInt = 1
    """Actors in this role. Learners with >1 worker form a DeepSpeed data-parallel group."""
    num_gpus: NonNegFloat = 0.0
    """GPUs per actor. With CUDA and every role at 0, each bundle gets 1/k of a GPU (k actors per GPU,
    enough to hold them all); else a role at 0 runs on the CPU. On CUDA a policy or critic with several
    workers needs a whole GPU each (NCCL refuses two ranks of one group on one GPU): checked before the run."""
    num_cpus: PositiveFloat | None = None
    """CPUs per actor, also its torch thread count (rounded, at least 1). Unset = auto: the cluster's CPUs
    (the local Ray's, or the cluster's) less what roles set here ask, split evenly over the actors left
    unset, rounded down to 0.01, at most 8 and at least 0.1 (smaller where whole actors must fit one node).
    The resolved plan is logged before PPO starts; `rlhf-dist doctor` prints it."""
    resources: dict[str, float] = msgspec.field(default_factory=dict)
    """Custom Ray resources per actor, e.g. {"node_a": 0.1} to pin a role to a node."""


class RolesConfig(_Strict):
    """Placement of the PPO roles: each role gets its own placement-group bundles."""

    rollout: RoleResources = RoleResources()
    policy: RoleResources = RoleResources()
    critic: RoleResources = RoleResources()
    reference: RoleResources = RoleResources()
    reward: RoleResources = RoleResources()
    colocate: bool = False
    """Put reference and reward in the policy learner's bundle and the critic beside it, to save devices."""
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement-group strategy for the bundles."""


class WandbConfig(_Strict):
    """Weights & Biases tracking. The API key is read only from the environment or netrc."""

    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """auto = WANDB_MODE / WANDB_DISABLED=true when set, else online when an API key is set (environment
    or netrc), else offline. Online falls back to offline (sync later) when W&B cannot be reached."""
    project: str = "rlhf-dist"
    """W&B project."""
    entity: str | None = None
    """W&B team or user; unset = the API key's default entity."""
    name: str | None = None
    """Run name; defaults to the save_dir's name."""
    group: str | None = None
    """W&B run group, e.g. to compare seeds; a plain name (no '/' or '..')."""
    tags: list[str] = msgspec.field(default_factory=list)
    """W&B run tags."""
    sample_every: PositiveInt = 5
    """Log a table of sample generations every N PPO iterations."""


class ClusterConfig(_Strict):
    """How to reach Ray. With no address (and no RAY_ADDRESS), a local Ray is started on loopback."""

    address: str | None = None
    """An existing cluster, e.g. "ray://head:10001" or "auto". RAY_ADDRESS in the environment also works."""
    bind_host: str = "127.0.0.1"
    """Node address of a locally started Ray (its dashboard/job server stays on 127.0.0.1). Anything
    else advertises Ray on that network: anyone who can reach Ray's ports can run code as you. Some of
    Ray's own services listen on all interfaces whatever this says, so a firewall and Ray's token
    authentication are what protect a machine on an untrusted network."""
    num_cpus: PositiveInt | None = None
    """CPUs of a locally started Ray (default: all)."""
    num_gpus: NonNegInt | None = None
    """GPUs of a locally started Ray (default: all)."""


class RLHFConfig(_Strict):
    """A whole run: SFT -> reward model -> PPO (or SFT -> DPO). Paths are relative to the working directory."""

    # --- models and devices -------------------------------------------------------------
    model_name: str
    """Base model: a Hugging Face model directory (or a hub id where a network exists)."""
    tokenizer_path: str | None = None
    """Tokenizer directory, or a `tokenizer.json` file; defaults to the policy's start (policy_model_path,
    sft/best_model or model_name). A file's special tokens (eos, pad, bos) and chat template come from the
    tokenizer_config.json or special_tokens_map.json (and chat_template.jinja) beside it, as AutoTokenizer
    reads them; a file with neither beside it names no eos and is an error."""
    policy_model_path: str | None = None
    """Bring your own policy: a Hugging Face causal-LM directory (or a hub id where a network exists) that
    reward, dpo and ppo start from instead of the SFT stage's sft/best_model; `run` then skips sft."""
    reference_model_path: str | None = None
    """PPO's (and eval's) frozen reference, in the policy's tokenizer; unset = the policy's start."""
    reward_model_path: str | None = None
    """Bring your own reward model (HF sequence classification, one label; directory or hub id) instead of
    reward_model/best_model; `run` then skips reward. Its tokenizer and chat template may differ from the
    policy's: the reward role then re-tokenises the decoded text."""
    critic_model_path: str | None = None
    """The critic's start (ppo only); unset = per critic_init (sft: the policy's start, reward: the reward
    model). The critic reads the policy's tokens, so it needs the policy's vocabulary (checked at start)."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """auto picks CUDA, then MPS, then CPU, and logs the choice."""
    seed: int = 42
    """Seeds everything random in a run: new weights (a score head) in each worker, the held-out split and
    data order of the offline stages, the prompt order, rollout sampling and mini-batch order of the online
    stage, and eval's sampling. Any int; a resumed run replays the same data order and sampling."""
    max_length: PositiveInt = 512
    """Longest sequence in tokens (prompt + response)."""
    zero_stage: Annotated[int, msgspec.Meta(ge=0, le=3)] = 2
    """DeepSpeed ZeRO stage for every trained model."""
    bf16: Literal["auto"] | bool = "auto"
    """Train and generate in bfloat16. auto: bf16 on CUDA, float32 elsewhere (logged at start); true
    without a GPU is an error. A role placed on the CPU in a GPU run (0 GPUs) stays in float32."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel of every model the run loads (learners, rollout, reference, reward, eval), passed to
    Hugging Face's from_pretrained. sdpa: torch's scaled_dot_product_attention (CPU and GPU); packed
    micro-batches (`*_max_tokens_per_micro_batch`) then attend per sequence in one row, through torch's flash
    varlen kernel on CUDA in bf16 (rlhf_dist/models/attention.py). eager: the model's plain matmul-softmax code
    (packed rows under a block mask). flash_attention_2: the flash-attn package's kernels, CUDA and bf16
    only; a worker where flash_attn is not importable fails before loading a model (it is not a dependency,
    and the driver need not have it)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping them (HF
    gradient_checkpointing_enable, non-reentrant) in the trained models only: SFT, the reward model, DPO,
    PPO's policy and critic. Less activation memory for one more forward per step; same gradients."""
    offload_optimizer: bool = False
    """ZeRO-Offload: keep the optimizer states (AdamW's moments and the fp32 master weights) and run the
    optimizer step in CPU memory instead of on the GPU (DeepSpeed's zero_optimization.offload_optimizer,
    device cpu, pinned memory). In bf16 it frees 12 bytes of GPU memory per trained parameter; each step moves the
    gradients to the CPU and the weights back. Needs zero_stage >= 1. The step stays a torch AdamW."""

    # --- LoRA -----------------------------------------------------------------------------
    lora_rank: NonNegInt = 0
    """LoRA (PEFT) rank of every trained model: SFT, the reward model, DPO, PPO's policy and critic (their
    `score` head trains in full). 0 = full fine-tuning. With LoRA, PPO starts no reference actor: the policy
    learner computes the reference's logprobs with its adapters off. Checkpoints hold the adapters;
    best_model and final_model are merged HF models. Not with zero_stage 3."""
    lora_alpha: PositiveFloat = 16.0
    """LoRA scale numerator: an adapter adds B @ A * lora_alpha / lora_rank to its weight."""
    lora_dropout: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.0
    """Dropout on the adapters' input during training."""
    lora_target_modules: list[str] | Literal["all-linear"] = msgspec.field(default_factory=lambda: list(LORA_TARGETS))
    """Modules that get adapters: names (suffixes of module names, as PEFT matches them; the default fits
    Llama, Mistral and Qwen2), or "all-linear" (every linear layer but the output head)."""

    # --- data handling ------------------------------------------------------------------
    bad_rows: Literal["error", "skip"] = "error"
    """error: a bad JSONL row stops the run naming file:line. skip: count and report skipped rows."""
    max_bad_fraction: UnitFloat = 0.01
    """In skip mode, abort when more than this fraction of a file's rows is bad."""
    truncate: bool = False
    """Over-length rows: false = error naming the line; true = truncate (responses from the right,
    prompts from the left) and report the count."""
    eval_fraction: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.1
    """Held-out share of each offline stage's data (SFT, reward, DPO, KTO rows) used to pick the best model."""

    # --- stages ---------------------------------------------------------------------
    stages: list[Literal[tuple(STAGES)]] | None = None  # type: ignore[valid-type]
    """The stages `rlhf-dist run` runs, in order, skipping those already complete in save_dir. Unset =
    sft, reward, ppo (reward left out when reward_model_weight is 0: PPO then loads no reward model).
    E.g. [sft, dpo] or [sft, ppo]. sft, when listed, comes first (the others start from its best model);
    ppo with reward_model_weight != 0 needs reward before it (or reward_model_path). A stage whose output
    is given is not run: sft when policy_model_path is set, reward when reward_model_path is set."""

    # --- Ray Train workers (every offline stage) -------------------------------------
    train_cpus_per_worker: PositiveFloat = 1.0
    """CPUs per Ray Train worker of the offline stages (SFT, reward, DPO, KTO); also its torch thread count."""
    train_gpus_per_worker: NonNegFloat = 1.0
    """GPUs per Ray Train worker when the device is CUDA."""

    # --- SFT ------------------------------------------------------------------------
    sft_data_path: str | None = None
    """SFT conversations: a JSONL, Parquet, JSON, CSV or Arrow file, a glob of shards, a `save_to_disk`
    directory or a hub id, in any layout of docs/data.md (`messages`, `prompt`+`response`, `prompt`+`completion`)."""
    sft_data_split: str = "train"
    """Split of a hub dataset or a `save_to_disk` DatasetDict at sft_data_path (files have only "train")."""
    sft_data_subset: str | None = None
    """Subset (configuration) of a hub dataset at sft_data_path; unset = its default."""
    sft_messages_field: str | None = None
    """Column of sft_data_path that holds the conversation (a list of role/content messages); unset = `messages`."""
    sft_prompt_field: str | None = None
    """Column of sft_data_path that holds the prompt (a string or messages); unset = `prompt`."""
    sft_response_field: str | None = None
    """Column of sft_data_path that holds the response (a string); unset = `response`."""
    sft_completion_field: str | None = None
    """Column of sft_data_path that holds TRL's completion (a string or messages); unset = `completion`."""
    sft_epochs: PositiveInt = 1
    """Passes over the SFT training split (>= 1); the best model is picked by held-out loss."""
    sft_batch_size: PositiveInt = 16
    """Global batch per optimizer step (across workers and accumulation)."""
    sft_micro_batch_size: PositiveInt | None = None
    """Per-worker micro-batch; default = sft_batch_size / sft_workers (no accumulation)."""
    sft_max_tokens_per_micro_batch: PositiveInt | None = None
    """Pack instead of pad: each worker's share of a batch goes into micro-batches of at most this many real
    tokens (a longer conversation goes alone), their sequences laid end to end with attention kept within
    each; sft_micro_batch_size is then unused. Unset = padded micro-batches of sft_micro_batch_size. The
    loss stays the same token-weighted mean. Set it to the tokens a micro-batch fits in memory, e.g.
    8 x max_length."""
    sft_lr: PositiveFloat = 1e-4
    """Peak AdamW learning rate of SFT (> 0): linear warmup, then cosine decay to 10% of it. About 1e-5 to
    2e-5 for billion-parameter models with full fine-tuning, 1e-4 to 2e-4 with LoRA."""
    sft_warmup_ratio: UnitFloat = 0.05
    """Share of SFT's optimizer steps (0 to 1) spent warming the learning rate up linearly from 0."""
    sft_workers: PositiveInt = 1
    """Ray Train workers of SFT (>= 1), a DeepSpeed data-parallel group; each gets
    train_cpus_per_worker CPUs and, on CUDA, train_gpus_per_worker GPUs. sft_batch_size must be a multiple of
    sft_micro_batch_size x sft_workers."""
    sft_eval_every: NonNegInt = 0
    """Evaluate every N steps (0 = once per epoch)."""

    # --- reward model ---------------------------------------------------------------
    reward_data_path: str | None = None
    """Preference pairs: a file, glob, `save_to_disk` directory or hub id (as sft_data_path), with `prompt`,
    `chosen`, `rejected` (UltraFeedback, TRL) or only `chosen` and `rejected` (HH-RLHF transcripts, TRL implicit
    prompt), and an optional numeric `margin`. See docs/data.md."""
    reward_data_split: str = "train"
    """Split of a hub dataset or a `save_to_disk` DatasetDict at reward_data_path (files have only "train")."""
    reward_data_subset: str | None = None
    """Subset (configuration) of a hub dataset at reward_data_path; unset = its default."""
    reward_prompt_field: str | None = None
    """Column of reward_data_path that holds the prompt (a string or messages); unset = `prompt`."""
    reward_chosen_field: str | None = None
    """Column of reward_data_path that holds the preferred response or conversation; unset = `chosen`."""
    reward_rejected_field: str | None = None
    """Column of reward_data_path that holds the other response or conversation; unset = `rejected`."""
    reward_epochs: PositiveInt = 1
    """Passes over the preference pairs' training split (>= 1); one is usual, more over-fits."""
    reward_batch_size: PositiveInt = 16
    """Global number of preference pairs per optimizer step."""
    reward_micro_batch_size: PositiveInt | None = None
    """Per-worker micro-batch of pairs; default = reward_batch_size / reward_workers (no
    accumulation). reward_batch_size must be a multiple of it x reward_workers."""
    reward_max_tokens_per_micro_batch: PositiveInt | None = None
    """Pack instead of pad, as sft_max_tokens_per_micro_batch, counting both sides of a pair (which stay in
    one micro-batch). Unset = padded micro-batches of reward_micro_batch_size pairs."""
    reward_lr: PositiveFloat = 5e-5
    """Peak AdamW learning rate of the reward model (> 0), warmup then cosine decay to 10%."""
    reward_warmup_ratio: UnitFloat = 0.05
    """Share of the reward stage's optimizer steps (0 to 1) spent on linear warmup."""
    reward_workers: PositiveInt = 1
    """Ray Train workers of the reward stage (>= 1), as sft_workers."""
    freeze_reward_backbone: bool = False
    """Train only the scalar head."""
    reward_center_coef: NonNegFloat = 0.01
    """Weight of the centering term coef * mean((r_chosen + r_rejected)^2)."""

    # --- DPO ------------------------------------------------------------------------
    dpo_data_path: str | None = None
    """Preference pairs, in the reward stage's sources and layouts (their margin is not used); unset =
    reward_data_path, read with the reward_* split, subset and column fields."""
    dpo_data_split: str = "train"
    """Split of a hub dataset or a `save_to_disk` DatasetDict at dpo_data_path (files have only "train")."""
    dpo_data_subset: str | None = None
    """Subset (configuration) of a hub dataset at dpo_data_path; unset = its default."""
    dpo_prompt_field: str | None = None
    """Column of dpo_data_path that holds the prompt (a string or messages); unset = `prompt`."""
    dpo_chosen_field: str | None = None
    """Column of dpo_data_path that holds the preferred response or conversation; unset = `chosen`."""
    dpo_rejected_field: str | None = None
    """Column of dpo_data_path that holds the other response or conversation; unset = `rejected`."""
    dpo_epochs: PositiveInt = 1
    """Passes over the preference pairs' training split (>= 1); DPO over-fits quickly, one or two is usual."""
    dpo_batch_size: PositiveInt = 16
    """Global number of preference pairs per optimizer step."""
    dpo_micro_batch_size: PositiveInt | None = None
    """Per-worker micro-batch of pairs; default = dpo_batch_size / dpo_workers (no accumulation)."""
    dpo_max_tokens_per_micro_batch: PositiveInt | None = None
    """Pack instead of pad, as sft_max_tokens_per_micro_batch, counting both sides of a pair (which stay in
    one micro-batch). Unset = padded micro-batches of dpo_micro_batch_size pairs."""
    dpo_lr: PositiveFloat = 1e-6
    """DPO moves a model far with a small learning rate: 5e-7 to 1e-6 is usual for billion-parameter models."""
    dpo_warmup_ratio: UnitFloat = 0.1
    """Share of DPO's optimizer steps (0 to 1) spent on linear warmup."""
    dpo_workers: PositiveInt = 1
    """Ray Train workers of DPO (>= 1), as sft_workers."""
    dpo_beta: PositiveFloat = 0.1
    """beta of DPO/IPO: the strength of the implicit KL pull towards the reference (the starting model);
    implicit rewards are beta * (log pi - log ref)."""
    dpo_loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: DPO's -log sigmoid(beta * h) (arXiv:2305.18290); ipo: (h - 1/(2 beta))^2 (arXiv:2310.12036),
    which stops pushing once the log-ratio margin h reaches 1/(2 beta)."""

    # --- KTO ------------------------------------------------------------------------
    kto_data_path: str | None = None
    """Completions labelled desirable or not, `{prompt, completion, label}` with label true or false, and/or
    preference pairs in any of the reward stage's layouts (each gives a desirable and an undesirable row); a
    file, glob, `save_to_disk` directory or hub id, as sft_data_path."""
    kto_data_split: str = "train"
    """Split of a hub dataset or a `save_to_disk` DatasetDict at kto_data_path (files have only "train")."""
    kto_data_subset: str | None = None
    """Subset (configuration) of a hub dataset at kto_data_path; unset = its default."""
    kto_prompt_field: str | None = None
    """Column of kto_data_path that holds the prompt (a string or messages); unset = `prompt`."""
    kto_completion_field: str | None = None
    """Column of kto_data_path that holds the completion (a string or messages); unset = `completion`."""
    kto_label_field: str | None = None
    """Column of kto_data_path that holds the label (true: desirable); unset = `label`."""
    kto_epochs: PositiveInt = 1
    """Passes over the training rows (>= 1)."""
    kto_batch_size: PositiveInt = 16
    """Global number of rows (labelled completions) per optimizer step; the reference point's KL estimate
    averages over the step's rows, so the paper advises 8 or more."""
    kto_micro_batch_size: PositiveInt | None = None
    """Per-worker micro-batch of rows; default = kto_batch_size / kto_workers (no accumulation)."""
    kto_max_tokens_per_micro_batch: PositiveInt | None = None
    """Pack instead of pad, as sft_max_tokens_per_micro_batch, counting each row and its mismatched pair.
    Unset = padded micro-batches of kto_micro_batch_size rows."""
    kto_lr: PositiveFloat = 1e-6
    """Peak learning rate (> 0). As dpo_lr: 5e-7 to 1e-6 is usual for billion-parameter models (the paper's 5e-6 for beta 0.1 and
    small batches is an upper end)."""
    kto_warmup_ratio: UnitFloat = 0.1
    """Share of the optimizer steps (0 to 1) over which the learning rate rises linearly to kto_lr; it then
    decays along a cosine to 10% of it."""
    kto_workers: PositiveInt = 1
    """Ray Train workers (data-parallel ranks, >= 1); kto_batch_size must be a multiple of kto_workers x the
    micro-batch."""
    kto_beta: PositiveFloat = 0.1
    """beta of KTO, > 0: the scale of the implicit reward beta * (log pi - log ref) inside the sigmoid; larger
    keeps the policy nearer the reference."""
    kto_desirable_weight: PositiveFloat = 1.0
    """lambda_D, > 0: the weight of a desirable row's loss. With unbalanced data the paper keeps
    lambda_D n_D / (lambda_U n_U) in [1, 4/3] (n: rows of each label)."""
    kto_undesirable_weight: PositiveFloat = 1.0
    """lambda_U, > 0: the weight of an undesirable row's loss."""

    # --- online RL (the `ppo` stage, whatever the algorithm) ----------------------------
    algorithm: Literal[tuple(ALGORITHMS)] = "ppo"  # type: ignore[valid-type]
    """The online algorithm; one driver runs them all, differing only in the advantages. ppo: a critic and
    GAE. grpo: group-normalised outcome rewards. rloo: leave-one-out baseline. reinforce_pp: REINFORCE++,
    batch-normalised returns with a group-mean baseline. The last three start no critic."""
    n_samples_per_prompt: PositiveInt = 1
    """Responses generated per prompt (a group); grpo and rloo need 2 or more."""
    grpo_norm_std: bool = True
    """grpo: divide by the group's standard deviation; false = Dr. GRPO (only subtract the group mean)."""
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"] = "token_mean"
    """How the policy loss averages its per-token terms: over all tokens of the mini-batch (each token weighs
    the same), over sequences of per-sequence token means (each sequence weighs the same, GRPO's original),
    or over sequences of per-sequence token sums (no length normalisation, Dr. GRPO)."""
    ppo_data_path: str | None = None
    """Prompts: a file, glob, `save_to_disk` directory or hub id (as sft_data_path) with a `prompt` column (a
    string or messages) or OpenAI `messages` (the turns before the last assistant reply), or JSONL strings. Read
    on demand: memory holds 8 bytes a prompt, not the prompts. The row's other columns (e.g. `answer`) go with it."""
    ppo_data_split: str = "train"
    """Split of a hub dataset or a `save_to_disk` DatasetDict at ppo_data_path (files have only "train")."""
    ppo_data_subset: str | None = None
    """Subset (configuration) of a hub dataset at ppo_data_path; unset = its default."""
    ppo_prompt_field: str | None = None
    """Column of ppo_data_path that holds the prompt (a string or messages); unset = `prompt`."""
    ppo_iterations: PositiveInt = 10
    """Online iterations (>= 1): each generates from ppo_batch_size prompts, scores the samples, runs
    ppo_epochs of updates over them and syncs the weights to the rollout."""
    ppo_batch_size: PositiveInt = 16
    """Prompts per iteration; each gives n_samples_per_prompt samples."""
    ppo_mini_batch_size: PositiveInt = 8
    """Samples per optimizer step; ppo_batch_size x n_samples_per_prompt must be a multiple."""
    ppo_micro_batch_size: PositiveInt | None = None
    """Per-learner-worker micro-batch (gradient accumulation); default = mini-batch / workers."""
    ppo_max_tokens_per_micro_batch: PositiveInt | None = None
    """Pack instead of pad in the policy and critic updates: each worker's share of a mini-batch goes into
    micro-batches of at most this many real tokens (prompt and response; a longer sample goes alone), laid
    end to end with attention kept within each sample; ppo_micro_batch_size is then unused by the updates.
    The losses keep their token or sequence weighting (loss_agg). Unset = padded micro-batches."""
    ppo_forward_micro_batch_size: PositiveInt | None = None
    """Samples per forward pass of the no-gradient forwards: the reference's logprobs, the reward model's
    scores and the learners' old logprobs and values. Bounds their activation memory, which otherwise
    grows with the batch; default = the policy learner's micro-batch (ppo_micro_batch_size or
    mini-batch / policy workers)."""
    ppo_epochs: PositiveInt = 1
    """Passes over each iteration's samples (>= 1), in shuffled mini-batches of ppo_mini_batch_size: ppo_epochs
    x ppo_batch_size x n_samples_per_prompt / ppo_mini_batch_size optimizer steps per iteration."""
    ppo_lr_policy: PositiveFloat = 1e-5
    """AdamW learning rate of the policy learner (> 0), constant (no warmup or decay). About 1e-6 for
    billion-parameter models with full fine-tuning."""
    ppo_lr_value: PositiveFloat = 1e-5
    """AdamW learning rate of the critic learner (> 0, ppo only), constant; often 2-10x ppo_lr_policy."""
    ppo_clip_range: PositiveFloat = 0.2
    """epsilon of the clipped surrogate (> 0): the policy ratio is clipped to [1 - eps, 1 + eps]
    (Schulman et al. 2017, arXiv:1707.06347). 0.2 is usual."""
    ppo_value_clip_range: PositiveFloat = 0.2
    """Clip of the value loss (> 0, ppo only): the loss is the larger of the unclipped squared error and
    that of values held within this distance of the rollout-time values (openai/baselines ppo2)."""
    ppo_gamma: UnitFloat = 1.0
    """Discount per response token (0 to 1) of GAE (ppo) and REINFORCE++'s returns; 1 = no discount, as
    usual for a score given at the end of the response."""
    ppo_lam: UnitFloat = 0.95
    """GAE's lambda (0 to 1, ppo only): 1 = Monte-Carlo returns less the value (more variance), 0 = one-step
    TD (more bias). arXiv:1506.02438."""
    ppo_entropy_coef: NonNegFloat = 0.0
    """Weight (>= 0) of the entropy bonus subtracted from the policy loss; 0 = none (the logged entropy
    is then that of one sequence)."""
    ppo_max_grad_norm: PositiveFloat = 1.0
    """Clip the global gradient norm of the policy and critic updates to this (> 0). (The SFT, reward
    and DPO stages clip at 1.0.)"""
    ppo_whiten_advantages: bool = True
    """ppo: normalise GAE's advantages to mean 0 and standard deviation 1 over the batch's response
    tokens."""
    ppo_recompute_old_logprobs: Literal["auto"] | bool = "auto"
    """Where PPO's old logprobs come from. false: the rollout's sampling logprobs (one forward pass fewer;
    in float32 they match the learner's forward to ~1e-6). true: the policy learner recomputes them, as
    OpenRLHF and verl do. auto: true when the rollout or the policy learner runs in bf16, whose decode and
    training forward differ by far more, else false. Cannot be combined with ppo_overlap_rollout."""
    ppo_overlap_rollout: bool = False
    """true: the rollout of iteration k+1 runs while iteration k's experience and learner phases run, on
    the weights from before iteration k's update (one-step off-policy; `rollout_lag` in the metrics). With
    the rollout's logprobs as old logprobs, PPO's ratio corrects for the lag. Pays where the rollout has
    devices or cores of its own, or leaves cores idle (docs/benchmarks.md). A resumed run redoes the
    first rollout on-policy, so it is not bit-identical to an uninterrupted one."""
    critic_init: Literal["sft", "reward"] = "sft"
    """Initialise the critic from the policy's start (default) or from the reward model (ppo only; unused
    when critic_model_path is set)."""

    kl_in: Literal["reward", "loss"] = "reward"
    """Where the KL to the reference goes: a per-token penalty in the reward (PPO's classic form, estimated
    with k1, whose policy gradient is exactly the KL's), or a term of the policy loss (GRPO's form, with k3
    or k2: differentiated directly, k1 would have zero expected gradient). See rlhf_dist/algo/kl.py."""
    kl_estimator: Literal["k1", "k2", "k3"] | None = None
    """None = k1 with kl_in: reward, k3 with kl_in: loss. k1 is the only one allowed in the reward."""
    kl_coef: NonNegFloat = 0.05
    """Coefficient (>= 0) of the KL to the reference, in the reward or the loss as kl_in says; the adaptive
    controller's starting value when kl_target is set. 0 = no KL term. Usual: 0.01-0.1 in the reward, 0.001-0.04 in
    the loss (GRPO)."""
    kl_target: PositiveFloat | None = None
    """Set to use the adaptive KL controller (Ziegler et al. 2019); unset = fixed coefficient."""
    kl_horizon: PositiveInt = 10000
    """The adaptive controller's horizon, in prompts (>= 1): per iteration the coefficient moves by at most
    20% x ppo_batch_size / kl_horizon (Ziegler et al. 2019). Used only with kl_target."""

    # --- online RL: the `ppo` stage's scores (sources' table: config/rewards.py; docs/rewards.md) ---
    reward_fn: str | None = None
    """Python reward `module:function(prompts, responses, metadata) -> list[float | None]`, e.g.
    rlhf_dist.demo:positivity_reward. prompts: the last message before each response; metadata (optional
    parameter): each prompt row's other fields, e.g. {"answer": ...}; None: this response has no score
    (masked out of the update). docs/rewards.md."""
    reward_fn_weight: float = 1.0
    """Weight of reward_fn's value in the combined score; 0 = reward_fn is not called."""
    reward_model_weight: float = 1.0
    """Weight of the reward model's score; 0 = no reward model (it is then not loaded)."""
    reward_url: str | None = None
    """URL of an HTTP reward server: it gets POSTed {"prompts", "responses", "sample_ids", "metadata"} and
    answers {"scores"}. `env:NAME` reads the URL (and any token in it) from the environment variable NAME where
    the reward role runs, keeping it out of config.json, the logs and W&B. docs/rewards.md."""
    reward_url_weight: float = 1.0
    """Weight of the server's score in the combined score; 0 = the server is not asked."""
    reward_url_timeout_s: PositiveFloat = 60.0
    """Seconds one request to reward_url may take, connecting included; then it is retried or times out."""
    reward_url_retries: NonNegInt = 2
    """Further tries of a request that timed out, lost its connection or got a 5xx or 429, after 0.5 s, 1 s,
    2 s... A malformed reply, the wrong number of scores or another status is not retried."""
    reward_url_concurrency: PositiveInt = 8
    """Requests to reward_url in flight at once, per reward worker."""
    reward_url_batch_size: PositiveInt = 64
    """Samples per request to reward_url."""
    reward_max_failed_fraction: UnitFloat = 0.1
    """Stop the online run when more than this share of an iteration's samples got no reward (a source timed
    out or failed on them), naming the source; below it, those samples (with group algorithms their whole
    group) are masked out of the update and counted in the metrics (reward_failed*). 1 = never stop."""
    overlong_penalty: NonNegFloat = 0.0
    """Subtracted from the score of a response cut off at gen_max_new_tokens without eos (0 = none)."""
    reward_normalize: bool = False
    """Normalise scores by their running mean and std over the run (saved in each checkpoint's state)."""
    reward_clip: PositiveFloat | None = None
    """Clip (normalised) scores to [-reward_clip, reward_clip]; unset = no clipping."""

    safety_filter: str | None = None
    """What flags unsafe responses (rlhf_dist/rewards/safety.py): a rule file, one rule per line, a literal word or
    phrase or `re:PATTERN`, matched case-insensitively as a whole word or phrase (`#` starts a comment
    line); or a classifier `module:function(prompts, responses) -> [(flagged: bool, reason: str), ...]`.
    In online RL each flagged rollout is penalised or dropped (safety_action), its rate is logged as
    `safety/flagged_rate` and each flagged one goes to ppo/samples.jsonl with its reason; `rlhf-dist eval`
    reports each checkpoint's flagged rate. Unset = no filter."""
    safety_action: Literal["penalize", "drop"] = "penalize"
    """penalize: subtract safety_penalty from a flagged rollout's score. drop: leave the flagged rollout's
    whole prompt group out of the update (its rows stay, masked: no tokens, no loss units, no group
    baseline), so the batch keeps its mini-batches and groups."""
    safety_penalty: NonNegFloat = 1.0
    """Subtracted from a flagged rollout's score (safety_action: penalize), in the score's units, before
    reward_normalize and reward_clip, as overlong_penalty is."""

    gen_max_new_tokens: PositiveInt = 32
    """Most tokens (>= 1) generated per response; must be < max_length. A response cut off here
    without eos can be penalised with overlong_penalty."""
    gen_batch_size: PositiveInt | None = None
    """Prompts per generate call of a rollout worker: it generates its slice in chunks of this many and
    merges them, so its KV cache and logits hold one chunk. Unset = the whole slice at once. The chunks
    draw from one seeded generator in order, so a run stays reproducible."""
    gen_temperature: PositiveFloat = 1.0
    """Sampling temperature of the rollout (> 0). Logprobs (the policy's, the reference's, eval's KL)
    are computed at the same temperature, so the policy ratio is that of the sampling distribution."""
    gen_top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    """Nucleus sampling (0 < p <= 1): sample from the smallest set of tokens whose probability reaches p;
    1 = off."""
    gen_top_k: NonNegInt = 0
    """0 = no top-k filtering."""
    gen_min_new_tokens: NonNegInt = 0
    """eos cannot be sampled before this many new tokens (HF's min_new_tokens); benchmarks use it to fix
    response lengths. The recorded logprobs stay those of the policy's unmodified softmax."""
    gen_compile: bool = False
    """Run the rollout's decode step through torch.compile (Llama, Mistral and Qwen2 models; others decode
    through the model's own forward). It fuses the elementwise work around the matmuls: 1.02-1.12x decode
    tokens/s on the CPU benchmark model (docs/benchmarks.md); not measured on a GPU. Each rollout worker
    compiles on its first rollout (3-15 s on CPU; torch caches compiled code on disk for later processes),
    with as many compile processes as it has CPUs, and once more per new batch size or cache-length
    bucket. Finished rows stay in the batch until all rows are done."""
    rollout_engine: Literal[("auto", *ENGINES)] = "auto"  # type: ignore[valid-type]
    """What the rollout (and eval) generates with. vllm: vLLM (`pip install -e '.[vllm]'`; an error before any
    stage starts if it is not installed). hf: the HF model decoded in the rollout actor (rlhf_dist/rollout/decode.py).
    auto: vLLM where it is installed and the rollout is on a GPU, else hf. The start-up log and
    `rlhf-dist doctor` say which engine each rollout worker runs, and why."""
    vllm_gpu_memory_utilization: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    """Share of its GPU's memory that vLLM may take (weights, activations, KV cache), from 0 to 1. Unset =
    0.85 x the rollout worker's GPU share (roles.rollout.num_gpus, or the automatic share): 0.85 on a GPU of
    its own, 0.2125 on a quarter of one."""
    vllm_tensor_parallel_size: PositiveInt = 1
    """GPUs each vLLM engine shards the model over; more than 1 needs roles.rollout.num_gpus equal to it."""
    vllm_enforce_eager: bool = False
    """Run vLLM without CUDA graphs or torch.compile: a faster start, slower decoding. Always eager on a CPU."""
    vllm_sleep: Literal["auto"] | bool = "auto"
    """Between rollouts, put vLLM to sleep (level 1: its KV cache freed, its weights moved to host memory),
    so the learners sharing its GPU can use that memory; it wakes before the next weight sync. auto: on when
    the rollout worker has a fraction of a GPU (it shares it with another role). No effect on a CPU."""
    vllm_cpu_kv_cache_gib: PositiveFloat = 1.0
    """On a CPU, GiB of host memory for each vLLM engine's KV cache."""

    roles: RolesConfig = RolesConfig()
    call_timeout_s: PositiveFloat = 600.0
    """Timeout of every remote call once the roles are up, and of the learners' collectives; a timeout is
    an error naming the role and the phase."""
    setup_timeout_s: PositiveFloat = 1800.0
    """Timeout of starting up: placing the PPO roles, loading their weights and building their DeepSpeed
    engines (whose first start on a machine compiles an op for minutes), restarting a killed actor, and
    starting a Ray Train worker group. Kept apart from call_timeout_s so that a short call timeout, which
    finds a hung step sooner, does not fail a slow start."""
    sync_timeout_s: PositiveFloat = 300.0
    """Timeout of the weight-sync collective."""

    # --- faults and health ----------------------------------------------------------
    max_restarts: NonNegInt = 3
    """Restarts of a killed actor: a PPO rollout, reference or reward actor (it reloads the current
    weights and the iteration is redone), or an offline stage's (SFT, RM, DPO, KTO) Ray Train worker group (it resumes from its
    last checkpoint)."""
    max_learner_restarts: NonNegInt = 2
    """Times PPO reloads its last complete checkpoint after a policy or critic learner dies."""
    max_bad_steps: PositiveInt = 3
    """Abort PPO after this many iterations in a row whose update was skipped for non-finite rewards,
    advantages, losses or gradient norms."""
    kl_max: PositiveFloat | None = None
    """Stop PPO when the batch KL to the reference exceeds this; the last good checkpoint is kept. Unset = no limit."""
    sync_logprob_tolerance: PositiveFloat | None = None
    """Largest allowed difference between the rollout's log-probs and the policy learner's for the same tokens
    (`rollout_logprob_diff` when the learner recomputes them, else the first mini-batch's max |ratio - 1|,
    on on-policy iterations). Unset: 1e-3 when the rollout and the learner run in float32, 1.0 when either
    runs in bf16. Over it for sync_max_drift_iterations iterations in a row stops the run (HealthError):
    the rollout is not generating with the learner's weights."""
    sync_max_drift_iterations: PositiveInt = 3
    """Iterations in a row over sync_logprob_tolerance before the run stops."""
    grad_spike_factor: PositiveFloat = 10.0
    """Log an alarm when a learner's gradient norm exceeds this many times its median over the last 20 iterations."""
    train_save_steps: NonNegInt = 0
    """Offline stages (SFT, RM, DPO, KTO): save a Ray Train checkpoint (weights and optimizer state, to resume from) every N
    steps; 0 = at the end of each epoch."""

    # --- outputs --------------------------------------------------------------------
    save_dir: str = "runs/default"
    """Directory of every output of the run (checkpoints, metrics, logs, config.json); relative to the
    working directory, and on storage every node shares for a cluster run. Must not contain '..'."""
    save_interval: PositiveInt = 5
    """Save ppo/iteration_NNNNNN every N PPO iterations."""
    save_total_limit: PositiveInt | None = None
    """Keep the newest N complete ppo/iteration_* directories: older ones are deleted (and logged) after each
    successful save. Unset = keep all."""
    eval_every: NonNegInt = 0
    """Every N online iterations (and after the last), generate on held-out prompts with the current weights
    and log their reward (and each reward source's mean: rm_score, fn_score, url_score), KL to the reference and length as `eval/*` in the
    metrics, W&B and the report; no update. 0 = off."""
    eval_data_path: str | None = None
    """Held-out prompts for eval_every (prompt rows; a response field is ignored), from any source of
    ppo_data_path. Default: the eval.jsonl beside sft_data_path, as `rlhf-dist eval` uses."""
    eval_data_split: str = "train"
    """Split of a hub dataset or a `save_to_disk` DatasetDict at eval_data_path (files have only "train")."""
    eval_data_subset: str | None = None
    """Subset (configuration) of a hub dataset at eval_data_path; unset = its default."""
    eval_prompt_field: str | None = None
    """Column of eval_data_path that holds the prompt (a string or messages); unset = `prompt`."""
    eval_num_prompts: PositiveInt = 64
    """The first N rows of the held-out prompts are used."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Level of the run log (driver and workers, save_dir/logs/run.log) and the console; vLLM logs one
    level quieter."""
    wandb: WandbConfig = WandbConfig()
    cluster: ClusterConfig = ClusterConfig()

    # ------------------------------------------------------------------------------------
    def check(self) -> "RLHFConfig":
        """Cross-field checks (`checks.py`). Raises ConfigError naming the fields; never rewrites a value."""
        errors = config_errors(self)
        if errors:
            raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
        return self

    def run_stages(self) -> tuple[str, ...]:
        """The stages `run` runs: `stages`, or its documented default, less those whose output is given."""
        if self.stages is not None:
            listed = tuple(self.stages)
        else:
            listed = ("sft", "reward", "ppo") if self.reward_model_weight != 0 else ("sft", "ppo")
        given = self.given_stages()
        return tuple(s for s in listed if s not in given)

    def given_stages(self) -> dict[str, str]:
        """{stage: field} for the stages whose output a *_model_path field gives: `run` skips them."""
        return {s.name: s.given_by for s in STAGES.values() if s.given_by and getattr(self, s.given_by) is not None}

    def to_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)
