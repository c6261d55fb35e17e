"""`VLLMEngine`: the rollout engine on vLLM (`vllm.LLM` in the rollout actor; vLLM starts its own engine
and worker processes under it).

- **Prompts** go in as token ids. Consecutive copies of one prompt (the driver repeats each prompt
  n_samples_per_prompt times) become one request with vLLM's `n`, so a group shares its prompt's prefill.
- **Log-probs.** vLLM's `processed_logprobs` are taken after top-k/top-p, and its default `raw_logprobs`
  before the temperature (vLLM 0.32's `vllm/v1/sample/sampler.py` shows the order). Neither is what
  the learner scores, softmax(logits / T) untruncated. So the temperature goes into the model's logits
  layer (`LogitsProcessor.scale = 1 / T`, set in the workers) and vLLM samples at temperature 1: its raw
  logprobs are then exactly the tempered, untruncated ones, and top-k/top-p and the eos ban before
  `min_new_tokens` apply to the tempered logits, as in the HF engine (tests/test_vllm.py checks both).
- **Weights** arrive bucket by bucket (`load_bucket`) through `collective_rpc` into `vllm_worker.WeightLoader`:
  raw bytes from a CPU tensor, a CUDA IPC handle from a GPU one. `update_weights` finishes vLLM's layerwise
  reload, resets the prefix cache (its KV entries came from the old weights) and stamps the version.
- **Sleep.** With `sleep`, the engine sleeps (level 1: KV cache freed, weights to host memory) after each
  generate and wakes on the next load or generate. Level 1, not 2: a rollout that follows no sync (an
  iteration whose update was skipped) must still find the weights.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

import torch

from .decode import left_pad, to_samples
from .engine import SamplingParams
from .samples import Samples
from .transfer import export_ipc

log = logging.getLogger(__name__)

WORKER_EXTENSION = "rlhf_dist.rollout.vllm_worker.WeightLoader"


def prompt_runs(prompt_ids: list[list[int]]) -> list[tuple[int, int]]:
    """(first row, count) of each run of consecutive identical prompts: one vLLM request with n=count each."""
    runs: list[tuple[int, int]] = []
    for i, p in enumerate(prompt_ids):
        if runs and prompt_ids[runs[-1][0]] == p:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def vllm_log_level(ours: str) -> str:
    """vLLM's logging level for the run's log_level: one step quieter (its INFO is a wall of lines)."""
    return {"DEBUG": "DEBUG", "INFO": "WARNING"}.get(ours.upper(), "ERROR")


class VLLMEngine:
    """A `RolloutEngine` on `vllm.LLM`. `device`: "cuda" or "cpu"; on a CPU vLLM runs eager with a KV cache
    of `cpu_kv_cache_gib`, on a GPU with `gpu_memory_utilization` of its memory."""

    def __init__(self, model_dir: str, *, device: str, dtype: str, max_model_len: int, seed: int,
                 gpu_memory_utilization: float = 0.85, tensor_parallel_size: int = 1, enforce_eager: bool = False,
                 sleep: bool = False, cpu_kv_cache_gib: float = 1.0, log_level: str = "INFO", version: int = 0,
                 on_death: Callable[[str], None] | None = None):
        level = vllm_log_level(log_level)
        os.environ["VLLM_LOGGING_LEVEL"] = level  # read at import, by its engine and worker processes too
        logging.getLogger("vllm").setLevel(level)  # lines logged while vllm imports, before it reads the variable
        from vllm import LLM  # deferred: loading vllm takes seconds

        # On a CPU, a token budget that fits 256 whole prompts: vLLM 0.32's CPU build crashes ("CPU Generator
        # does not use offset") when a seeded request's prefill is split over steps, as its default budget
        # of 4096 tokens does to a batch of long prompts.
        kw = {"gpu_memory_utilization": gpu_memory_utilization} if device == "cuda" else {
            "kv_cache_memory_bytes": int(cpu_kv_cache_gib * 2**30), "max_num_seqs": 256,
            "max_num_batched_tokens": 256 * max_model_len}
        self.llm = LLM(model=model_dir, dtype=dtype, max_model_len=max_model_len, seed=seed,
                       tensor_parallel_size=tensor_parallel_size, enforce_eager=enforce_eager or device != "cuda",
                       enable_prefix_caching=True, enable_sleep_mode=sleep, skip_tokenizer_init=True,
                       generation_config="vllm", logprobs_mode="raw_logprobs", worker_extension_cls=WORKER_EXTENSION,
                       **({"distributed_executor_backend": "mp"} if tensor_parallel_size > 1 else {}), **kw)
        self.sleep, self.asleep, self.loading = sleep, False, False
        self.scale: float | None = None  # the logits scale the workers hold (1 / temperature)
        self.version = version
        if on_death is not None:
            self._watch(on_death)

    def _watch(self, on_death: Callable[[str], None]) -> None:
        """Call on_death(why) from a daemon thread once vLLM marks its engine dead (its own monitor saw the
        engine process exit). A request in flight then can wait forever in vLLM 0.32's client, so the
        caller must not rely on an exception reaching it."""
        resources = getattr(self.llm.llm_engine.engine_core, "resources", None)  # a multiprocess client's
        if resources is None:
            return

        def watch():
            while not resources.engine_dead:
                time.sleep(0.5)
            name = getattr(resources.engine_manager, "failed_proc_name", None) or "engine core"
            on_death(f"vLLM's {name} process exited")

        threading.Thread(target=watch, daemon=True, name="vllm-engine-watch").start()

    # ---- generation --------------------------------------------------------------
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams, *, pad_id: int, eos_id: int,
                 sample_ids: list[int] | None = None, generator: torch.Generator | None = None) -> Samples:
        from vllm.inputs import TokensPrompt  # deferred: loading vllm takes seconds

        self._wake()
        self._set_temperature(sampling.temperature)
        runs = prompt_runs(prompt_ids)
        # One draw from the caller's generator seeds the call; each request gets its own seed from it.
        base = int(torch.randint(0, 2**31 - len(runs), (1,), generator=generator,
                                 device=generator.device if generator is not None else "cpu"))
        params = [self._params(sampling, eos_id, n, base + i) for i, (_, n) in enumerate(runs)]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=prompt_ids[i]) for i, _ in runs], params,
                                 use_tqdm=False)
        completions = [c for o in outs for c in sorted(o.outputs, key=lambda c: c.index)]  # prompt order
        samples = self._to_samples(prompt_ids, completions, sampling.max_new_tokens, pad_id, sample_ids)
        if self.sleep:
            self.llm.sleep(level=1)
            self.asleep = True
        return samples

    @staticmethod
    def _params(s: SamplingParams, eos_id: int, n: int, seed: int):
        from vllm import SamplingParams as VLLMSampling  # deferred: loading vllm takes seconds

        # temperature 1: the temperature is in the logits (see the module docstring). ignore_eos drops the
        # model config's eos; the run's eos_id stops a response (kept in it) and is banned before min_tokens.
        return VLLMSampling(n=n, temperature=1.0, top_p=s.top_p, top_k=s.top_k, max_tokens=s.max_new_tokens,
                            min_tokens=s.min_new_tokens, logprobs=0, seed=seed, ignore_eos=True,
                            stop_token_ids=[eos_id], detokenize=False)

    def _to_samples(self, prompt_ids: list[list[int]], completions: list, max_new: int, pad_id: int,
                    sample_ids: list[int] | None) -> Samples:
        """vLLM's completions (one per prompt row, in order) -> `Samples`, as the HF decoder lays them out."""
        B = len(prompt_ids)
        tokens = torch.full((B, max_new), pad_id, dtype=torch.long)  # (B, R)
        logps = torch.zeros((B, max_new), dtype=torch.float32)  # (B, R)
        lengths = torch.zeros(B, dtype=torch.long)  # (B,)
        for row, c in enumerate(completions):
            ids = list(c.token_ids)
            tokens[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            logps[row, :len(ids)] = torch.tensor([d[t].logprob for d, t in zip(c.logprobs, ids)])
            lengths[row] = len(ids)
        ids, attn = left_pad(prompt_ids, pad_id)  # (B, P)
        return to_samples(ids, attn, tokens, logps, lengths, sample_ids, self.version)

    def _set_temperature(self, temperature: float) -> None:
        if self.scale != 1.0 / temperature:
            if not all(self.llm.collective_rpc("rlhf_set_logit_scale", args=(1.0 / temperature,))):
                raise RuntimeError("vLLM engine: the model has no logits layer (LogitsProcessor) to put the "
                                   "temperature in; its logprobs would not be the learner's distribution")
            self.scale = 1.0 / temperature

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def close(self) -> None:
        """Stop vLLM's engine and worker processes now (they otherwise go when this object is collected)."""
        self.llm.llm_engine.engine_core.shutdown()

    # ---- weights -----------------------------------------------------------------
    def check_signature(self, signature: list, who: str) -> None:
        """vLLM maps the HF names onto its own (fused) layout as it loads; an unknown name fails there."""

    def load_bucket(self, flat: torch.Tensor, entries: list[tuple[str, tuple]]) -> tuple[int, int, int]:
        self._wake()
        if not self.loading:
            self.llm.collective_rpc("rlhf_begin_sync")
            self.loading = True
        payload = (("ipc", export_ipc(flat)) if flat.is_cuda else
                   ("bytes", str(flat.dtype).removeprefix("torch."), flat.contiguous().view(torch.uint8).numpy().tobytes()))
        prints = self.llm.collective_rpc("rlhf_load_bucket", args=(payload, [(n, list(s)) for n, s in entries]))
        return tuple(prints[0]) if all(p == prints[0] for p in prints) else (-1, -1, -1)  # every TP worker's must agree

    def update_weights(self, version: int) -> None:
        if self.loading:
            self.llm.collective_rpc("rlhf_finish_sync")
            self.loading = False
        self.llm.reset_prefix_cache()  # its KV entries were computed with the old weights
        self.version = version


def vllm_sleeps(setting: "bool | str", device_type: str, gpu_share: float) -> bool:
    """Whether a vLLM rollout sleeps between rollouts: auto = on a fraction of a GPU (shared with a role)."""
    if device_type != "cuda":
        return False  # vLLM's CPU build has no sleep mode
    return gpu_share < 1 if setting == "auto" else bool(setting)


def build(cfg, model_dir: str, device: torch.device, bf16: bool, gpu_share: float,
          on_death: Callable[[str], None] | None = None) -> VLLMEngine:
    """The engine table's builder (`config/engines.py`): vLLM on `model_dir`, sized to the slot's GPU share."""
    share = min(gpu_share, 1.0)
    return VLLMEngine(model_dir, device=device.type, dtype="bfloat16" if bf16 else "float32",
                      max_model_len=cfg.max_length, seed=cfg.seed,
                      gpu_memory_utilization=cfg.vllm_gpu_memory_utilization or 0.85 * share,
                      tensor_parallel_size=cfg.vllm_tensor_parallel_size, enforce_eager=cfg.vllm_enforce_eager,
                      sleep=vllm_sleeps(cfg.vllm_sleep, device.type, share), cpu_kv_cache_gib=cfg.vllm_cpu_kv_cache_gib,
                      log_level=cfg.log_level, on_death=on_death)
