"""Rollout: prompts -> `Samples`, through a `RolloutEngine` (engine.py).

samples.py: `Samples` and merging / slicing them; decode.py: the HF decoder (KV cache, StaticDecoder,
sampling); engine.py: the engine interface, `SamplingParams` and `HFDecodeEngine`.
"""

from .decode import generate, generate_chunked, left_pad, sample_token
from .engine import HFDecodeEngine, RolloutEngine, SamplingParams
from .samples import Samples, merge_samples, slice_samples

__all__ = ["HFDecodeEngine", "RolloutEngine", "Samples", "SamplingParams", "generate", "generate_chunked",
           "left_pad", "merge_samples", "sample_token", "slice_samples"]
