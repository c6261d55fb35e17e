"""`rlhf-dist eval`: compare the checkpoints of a run on a held-out set, in one process (no Ray).

For each checkpoint (default: SFT, every complete PPO iteration, the final policy):

- ppl: perplexity of the reference responses, teacher-forced, on assistant tokens only;
- one sampled response per prompt, through PPO's rollout engine, with the config's gen_* settings and the
  same seed for every checkpoint, so differences come from the weights, not from the dice;
- bleu (sacrebleu corpus BLEU, 0-100) and rougeL (mean ROUGE-L F1) against the references;
- rm_score: mean reward-model score of the responses (the run's reward-model source, `rewards.model`);
- kl_ref: mean over prompts of sum_t (log pi(y_t) - log pi_ref(y_t)) on the policy's own samples (k1);
- win_rate_vs_sft: share of prompts where the RM prefers the checkpoint's response to the SFT
  policy's (ties count 1/2);
- gold: mean of a rule-based `module:function(prompts, responses[, metadata])` when one is given (a
  function reward source, `rewards.function`: metadata holds each eval row's other fields), over the
  responses it scored.
- flagged: the share of responses the config's safety_filter flags, when one is set.

Results go to save_dir/eval/results.json (metrics and settings) and save_dir/eval/results.md.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from ..algo import logprobs_from_logits
from ..config import ConfigError, RLHFConfig, load_config
from ..config.engines import ENGINES, installed_engines
from ..config.stages import OFFLINE
from ..data.encode import Encoded, encode_conversation, encode_prompt, pad_right
from ..data.read import read_dataset
from ..data.rows import DataError, Message
from ..io.checkpoint import MANIFEST, complete_iterations, is_complete, verify
from ..io.sources import check_model_paths, policy_start, reference_model
from ..io.sources import reward_model as find_reward_model
from ..io.tracking import setup_logging
from ..models.load import load_causal_lm, load_causal_lm_or_adapter, load_tokenizer, resolve_device
from ..models.packing import position_ids_from_mask
from ..models.precision import use_bf16
from ..rewards.base import RewardBatch, Scored, SourceContext
from ..rewards.function import FunctionSource
from ..rewards.model import RewardModelSource
from ..rewards.safety import load_safety_filter
from ..roles.weight_sync import push_weights
from ..rollout.engine import HFDecodeEngine, SamplingParams
from ..rollout.engines import choose_engine, make_engine
from ..rollout.samples import slice_samples, trim_samples
from ..steps.forwards import response_logprobs
from .results import eval_settings, format_table, metrics_row, write_results

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# What to evaluate, on what
# ---------------------------------------------------------------------------------------

def default_checkpoints(cfg: RLHFConfig) -> dict[str, str]:
    """Every complete checkpoint of the run's layout, in training order."""
    save = Path(cfg.save_dir)
    out: dict[str, str] = {}
    for stage in (s for s in OFFLINE if s.makes_policy):
        model = save / stage.out_dir / stage.output
        if is_complete(model):
            out[stage.name] = str(model)
    for it in complete_iterations(save / "ppo"):
        out[f"ppo/{it.name}"] = str(it / "policy")
    final = save / "ppo" / "final_model"
    if is_complete(final):
        out["final"] = str(final)
    return out


def parse_checkpoint_args(items: list[str]) -> dict[str, str]:
    """`["sft=runs/x/sft/best_model", ...]` -> {name: dir}."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--checkpoints {item!r}: expected NAME=DIR")
        out[name] = path
    return out


def _model_dir(path: str) -> str:
    """A PPO iteration directory holds the policy in policy/ (a LoRA run's: its adapter); accept either."""
    p = Path(path)
    is_model = lambda d: (d / "config.json").is_file() or (d / "adapter_config.json").is_file()  # noqa: E731
    if not is_model(p) and is_model(p / "policy"):
        return str(p / "policy")
    if not is_model(p):
        raise FileNotFoundError(f"{p}: not a model directory (no config.json)")
    return str(p)


def verify_checkpoint(path: str) -> None:
    """A sealed checkpoint is checked against its manifest before eval reads it: the directory itself, or
    a PPO iteration's policy/ (not its optimizer states). Plain HF directories have no manifest."""
    p = Path(path)
    if (p / MANIFEST).is_file():
        verify(p, under="policy" if (p / "policy").is_dir() else None)
    elif p.name == "policy" and (p.parent / MANIFEST).is_file():
        verify(p.parent, under="policy")


def eval_models(cfg: RLHFConfig, notes: list[str]) -> tuple[str, str, str | None]:
    """(policy's start, reference, reward model or None) as PPO resolves them (`io.sources`), verified."""
    check_model_paths(cfg)
    start = policy_start(cfg, "eval")
    reference, why = reference_model(cfg, start)
    if reference == cfg.model_name:
        notes.append(f"no complete SFT checkpoint: reference and win-rate baseline are model_name {cfg.model_name}")
    rm = find_reward_model(cfg, "eval")
    if rm is None:
        rm_dir = Path(cfg.save_dir) / "reward_model" / "best_model"
        notes.append(f"no reward model (reward_model_path, or a complete {rm_dir}): rm_score and win_rate_vs_sft skipped")
    log.info("eval: reference %s (%s); reward model %s", reference, why, f"{rm[0]} ({rm[1]})" if rm else "none")
    return start[0], reference, rm[0] if rm else None


def resolve_eval_data(cfg: RLHFConfig, data_path: str | None) -> Path:
    if data_path:
        return Path(data_path)
    if cfg.sft_data_path:
        guess = Path(cfg.sft_data_path).parent / "eval.jsonl"
        if guess.is_file():
            return guess
        raise DataError(f"no eval data: {guess} does not exist; pass --data PATH")
    raise DataError("no eval data: sft_data_path is not set, so there is no sibling eval.jsonl; pass --data PATH")


@dataclass
class EvalSet:
    prompts: list[list[Message]]  # conversation up to the reference response
    prompt_ids: list[list[int]]  # prompts with the generation prompt, tokenized
    references: list[str]  # the reference (last assistant) response
    conversations: list[Encoded]  # whole rows, with assistant loss masks, for perplexity
    metadata: list[dict]  # each row's other fields (e.g. answer), for the gold function

    @property
    def prompt_texts(self) -> list[str]:
        # What a reward function sees, as in PPO: the last message before the response.
        return [p[-1]["content"] for p in self.prompts]

    def __len__(self) -> int:
        return len(self.prompts)


def load_eval_set(tok, path: Path, num_prompts: int | None, max_length: int) -> EvalSet:
    rows, stats = read_dataset(path, "sft")
    if num_prompts is not None:
        rows = rows[:num_prompts]
    prompts, prompt_ids, refs, convs, meta = [], [], [], [], []
    for r in rows:
        prompts.append(r.messages[:-1])
        prompt_ids.append(encode_prompt(tok, r.messages[:-1]))
        refs.append(r.messages[-1]["content"])
        e = encode_conversation(tok, r.messages)
        if len(e.input_ids) > max_length:
            # Same limit as training; the rest of the row still counts if it has assistant tokens.
            e = Encoded(e.input_ids[:max_length], e.loss_mask[:max_length], min(e.prompt_len, max_length))
        convs.append(e)
        meta.append(r.fields)
    log.info("eval data %s: %d prompts (%s)", path, len(rows), stats.summary())
    return EvalSet(prompts, prompt_ids, refs, convs, meta)


# ---------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------

def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield i, min(n, i + size)


@torch.inference_mode()
def perplexity(model, convs: list[Encoded], pad_id: int, device: str, batch_size: int) -> float:
    """exp(token-weighted mean NLL) of the assistant tokens, teacher-forced."""
    nll, count = 0.0, 0
    for a, b in _batches(len(convs), batch_size):
        ids, attn = pad_right([e.input_ids for e in convs[a:b]], pad_id)  # (B, T)
        mask, _ = pad_right([e.loss_mask for e in convs[a:b]], 0)  # (B, T)
        ids, attn = ids.to(device), attn.to(device)
        logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn),
                       use_cache=False).logits  # (B, T, V)
        lp = logprobs_from_logits(logits[:, :-1], ids[:, 1:])  # (B, T-1): token t+1 given the prefix
        m = mask[:, 1:].to(device).float()  # (B, T-1)
        nll -= (lp.float() * m).sum().item()
        count += int(m.sum().item())
    return math.exp(nll / count) if count else float("nan")


def sample(model, es: EvalSet, tok, cfg: RLHFConfig, device: str, batch_size: int, engine=None) -> list:
    """One response per prompt through PPO's rollout engine, in length-sorted chunks of `batch_size`
    prompts drawing from one generator seeded by cfg.seed -> `Samples` of `batch_size` rows, in prompt
    order (sample_ids: indices into `es`). `engine`: a vLLM engine, which gets `model`'s weights first;
    None = the HF engine on `model`."""
    if engine is None:
        engine = HFDecodeEngine(model)
    else:
        push_weights(model.named_parameters(), engine.load_bucket)
        engine.update_weights(engine.version + 1)
    # Seeded afresh per call, so every checkpoint draws the same numbers: differences come from the weights.
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    sp = replace(SamplingParams.from_config(cfg), batch_size=batch_size)
    s = engine.generate(es.prompt_ids, sp, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                        sample_ids=list(range(len(es))), generator=gen)
    # The forward passes after this one (logprobs, reward model) take batch_size rows at a time too, each
    # no wider than its own rows need.
    return [trim_samples(slice_samples(s, a, b)) for a, b in _batches(len(s), batch_size)]


def decode(tok, batches: list) -> list[str]:
    return [tok.decode(r[m.bool()], skip_special_tokens=True)
            for s in batches for r, m in zip(s.responses, s.action_mask)]


@torch.inference_mode()
def seq_logprobs(model, batches: list, device: str, temperature: float) -> torch.Tensor:
    """Summed logprob of each sampled response under `model`: -> (N,)."""
    out = []
    for s in batches:
        lp = response_logprobs(model, s.sequences.to(device), s.attention_mask.to(device), s.prompt_len,
                               temperature)  # (B, R)
        out.append((lp.float().cpu() * s.action_mask).sum(1))  # (B,)
    return torch.cat(out)


def reward_batches(es: EvalSet, batches: list, responses: list[str]):
    """The sampled batches as reward-source batches (`rewards.base.RewardBatch`), sample_ids indexing `es`."""
    for s in batches:
        ids = list(s.sample_ids)
        yield RewardBatch([es.prompts[i] for i in ids], [responses[i] for i in ids], ids, [es.metadata[i] for i in ids],
                          s.sequences, s.attention_mask)


def score_with(source, es: EvalSet, batches: list, responses: list[str]) -> Scored:
    """A reward source's verdict on every sampled response: scores (N,), outcomes (N,)."""
    parts = [source.score(b) for b in reward_batches(es, batches, responses)]
    return Scored(torch.cat([p.scores for p in parts]), torch.cat([p.outcomes for p in parts]))


# ---------------------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------------------

@dataclass
class EvalRun:
    """What every checkpoint is evaluated against, loaded once."""

    cfg: RLHFConfig
    device: str
    bf16: bool
    batch_size: int
    start: str  # the policy's start: what a LoRA checkpoint's adapter is merged onto
    reference: str  # the KL reference, and the policy whose responses win rates compare against
    reward_model: str | None
    gold: str | None  # module:function
    gold_fn: FunctionSource | None
    data: Path
    tok: Any
    es: EvalSet
    ref_model: Any
    rm: RewardModelSource | None
    notes: list[str]
    engine: Any = None  # a vLLM engine shared by every checkpoint (rollout_engine), else None: the HF engine
    safety: Callable | None = None  # the config's safety_filter, loaded (rlhf_dist/rewards/safety.py)


def resolve_checkpoints(cfg: RLHFConfig, checkpoints: dict[str, str] | None) -> dict[str, str]:
    """{name: model dir}, each verified against its manifest; default: the run's own."""
    checkpoints = dict(checkpoints) if checkpoints else default_checkpoints(cfg)
    if not checkpoints:
        raise FileNotFoundError(f"{cfg.save_dir}: no complete checkpoint (sft/best_model, dpo/best_model, "
                                f"ppo/iteration_*, ppo/final_model); pass --checkpoints NAME=DIR")
    for p in checkpoints.values():
        verify_checkpoint(p)
    return {name: _model_dir(p) for name, p in checkpoints.items()}


def prepare(cfg: RLHFConfig, num_prompts: int | None, data_path: str | None, gold: str | None,
            batch_size: int) -> EvalRun:
    """Resolve and load the reference, the reward model, the gold function and the eval set."""
    device = resolve_device(cfg.device)
    bf16 = use_bf16(cfg.bf16, device)
    notes: list[str] = []
    start, reference, reward_model = eval_models(cfg, notes)
    gold = gold or cfg.reward_fn
    gold_fn = FunctionSource(gold, "--gold") if gold else None
    tok = load_tokenizer(cfg.tokenizer_path or start)
    data = resolve_eval_data(cfg, data_path)
    es = load_eval_set(tok, data, num_prompts, cfg.max_length)
    attn = cfg.attn_implementation
    ref_model = load_causal_lm(reference, bf16, attn).to(device).eval()
    rm = (RewardModelSource(cfg, reward_model, SourceContext(torch.device(device), bf16, tok, reward_model))
          if reward_model else None)
    safety = load_safety_filter(cfg.safety_filter) if cfg.safety_filter else None
    return EvalRun(cfg, device, bf16, batch_size, start, reference, reward_model, gold, gold_fn, data, tok, es,
                   ref_model, rm, notes, eval_engine(cfg, reference, device, bf16), safety)


def eval_engine(cfg: RLHFConfig, model_dir: str, device: str, bf16: bool):
    """The vLLM engine eval samples with, built once on `model_dir` (each checkpoint's weights are then
    loaded into it, as a weight sync would), when rollout_engine picks vLLM here; else None."""
    name, why = choose_engine(cfg.rollout_engine, device, installed_engines())
    log.info("eval: sampling with the %s engine (%s)", name, why)
    return make_engine(name, cfg, model_dir, torch.device(device), bf16, 1.0) if ENGINES[name].own_weights else None


def raw_pass(run: EvalRun, path: str) -> dict[str, Any]:
    """One checkpoint's responses and per-prompt figures, before averaging."""
    t0 = time.time()
    cfg, device, tok, es = run.cfg, run.device, run.tok, run.es
    same_as_ref = Path(path).resolve() == Path(run.reference).resolve()
    model = (run.ref_model if same_as_ref else
             load_causal_lm_or_adapter(path, run.bf16, run.start, cfg.attn_implementation).to(device).eval())
    batches = sample(model, es, tok, cfg, device, run.batch_size, run.engine)
    responses = decode(tok, batches)
    lp = seq_logprobs(model, batches, device, cfg.gen_temperature)  # (N,)
    lp_ref = lp if same_as_ref else seq_logprobs(run.ref_model, batches, device, cfg.gen_temperature)  # (N,)
    return {
        "responses": responses,
        "ppl": perplexity(model, es.conversations, tok.pad_token_id, device, run.batch_size),
        "kl": lp - lp_ref,  # (N,) per-prompt k1 estimate
        "lengths": torch.cat([s.action_mask.sum(1) for s in batches]).float(),  # (N,)
        "rm": score_with(run.rm, es, batches, responses).scores if run.rm else None,  # (N,)
        "gold": score_with(run.gold_fn, es, batches, responses) if run.gold_fn else None,
        "seconds": time.time() - t0,
    }


def evaluate_model(cfg: "RLHFConfig | str | os.PathLike | dict", checkpoints: dict[str, str] | None = None,
                   num_prompts: int | None = None, *, data_path: str | None = None, gold: str | None = None,
                   batch_size: int = 32) -> dict:
    """Evaluate `checkpoints` ({name: model dir}; default: the run's own) and write save_dir/eval/."""
    cfg = cfg if isinstance(cfg, RLHFConfig) else load_config(cfg)
    if num_prompts is not None and num_prompts <= 0:
        raise ConfigError(f"--num-prompts: must be positive, got {num_prompts}")
    checkpoints = resolve_checkpoints(cfg, checkpoints)
    run = prepare(cfg, num_prompts, data_path, gold, batch_size)
    cache: dict[str, dict[str, Any]] = {}  # resolved model dir -> raw results, so a dir is evaluated once

    def raw(path: str) -> dict[str, Any]:
        key = str(Path(path).resolve())
        if key not in cache:
            cache[key] = raw_pass(run, path)
        return cache[key]

    baseline = raw(run.reference) if run.rm else None  # the SFT responses that win rates compare against
    # Not sorted on write: checkpoints stay in training order.
    results: dict[str, Any] = {"settings": {}, "checkpoints": {}}
    bar = tqdm(list(checkpoints), desc="eval", unit="ckpt", disable=not sys.stderr.isatty())
    for name in bar:
        bar.set_postfix_str(name)
        m = metrics_row(run, checkpoints[name], raw(checkpoints[name]), baseline)
        results["checkpoints"][name] = m
        log.info("eval %s: %s", name, {k: round(v, 4) for k, v in m.items() if isinstance(v, float)})
    results["settings"] = eval_settings(run)
    if run.engine is not None:
        run.engine.close()
    for n in run.notes:
        log.warning("eval: %s", n)
    write_results(Path(cfg.save_dir) / "eval", results)
    return results


def cli_eval(args) -> int:
    """`rlhf-dist eval`: evaluate, write save_dir/eval/, print the table."""
    cfg = load_config(args.config, args.overrides)
    setup_logging(cfg.log_level)
    checkpoints = parse_checkpoint_args(args.checkpoints) if args.checkpoints else None
    results = evaluate_model(cfg, checkpoints, args.num_prompts, data_path=args.data, gold=args.gold)
    print(format_table(results))
    return 0
