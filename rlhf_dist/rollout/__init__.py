"""Rollout: prompts -> `Samples`, through a `RolloutEngine` (engine.py).

samples.py: `Samples` and merging / slicing them; decode.py: the HF decoder (KV cache, StaticDecoder,
sampling); engine.py: the engine interface, `SamplingParams` and `HFDecodeEngine`; engines.py: which
engine a worker runs, and building it; vllm_engine.py / vllm_worker.py: the vLLM engine and what runs
in vLLM's workers; transfer.py: weight buckets (splitting, fingerprints, CUDA IPC handles).
"""

from .decode import generate, generate_chunked, left_pad, sample_token
from .engine import HFDecodeEngine, RolloutEngine, SamplingParams
from .samples import Samples, merge_samples, slice_samples

__all__ = ["HFDecodeEngine", "RolloutEngine", "Samples", "SamplingParams", "generate", "generate_chunked",
           "left_pad", "merge_samples", "sample_token", "slice_samples"]
