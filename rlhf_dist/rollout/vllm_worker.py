"""What runs inside vLLM's worker processes: `VLLMEngine` names this class as vLLM's
`worker_extension_cls`, and calls its methods through `LLM.collective_rpc` (every tensor-parallel worker
runs each call).

Loading a sync is vLLM's layerwise in-place reload, split over the buckets: `rlhf_begin_sync` once,
`model.load_weights` per bucket (a layer is processed, fused and repacked for the kernels, once all of its
weights have arrived, so a bucket may end in the middle of one), `rlhf_finish_sync` at the end. That is
`reload_weights` (vllm/model_executor/model_loader/reload/inplace.py) with the weights streamed.
"""

from __future__ import annotations

import logging

import torch

from .transfer import fingerprint, open_ipc, split_bucket


def bucket_tensor(payload) -> torch.Tensor:
    """A bucket as it crossed into this process: ("bytes", dtype name, raw bytes) from a CPU engine
    (torch tensors in collective_rpc arrive as lists), or ("ipc", handle) from a CUDA one (opened on this
    worker's GPU, and copied: vLLM keeps a layer's weights until the layer is complete, and the sender
    frees the bucket once this call returns)."""
    if payload[0] == "ipc":
        return open_ipc(payload[1]).clone()
    _, dtype, raw = payload
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(getattr(torch, dtype))


class WeightLoader:
    """Mixed into vLLM's worker class; `self.model_runner` is the worker's."""

    def rlhf_set_logit_scale(self, scale: float) -> int:
        """Multiply the model's logits by `scale` (1 / temperature): vLLM's raw logprobs are then the
        tempered, untruncated distribution the learner scores. Returns how many logits layers it set."""
        from vllm.model_executor.layers.logits_processor import LogitsProcessor  # deferred: loading vllm takes seconds

        layers = [m for m in self.model_runner.get_model().modules() if isinstance(m, LogitsProcessor)]
        for m in layers:
            m.scale = scale
        return len(layers)

    def rlhf_begin_sync(self) -> None:
        from vllm.model_executor.model_loader.reload.layerwise import (
            initialize_layerwise_reload,  # deferred: loading vllm takes seconds
        )

        # A bucket holds some layers' weights only: the reload's per-layer "not loaded" warnings are expected.
        logging.getLogger("vllm.model_executor.model_loader.reload").setLevel(logging.ERROR)
        initialize_layerwise_reload(self.model_runner.get_model())

    def rlhf_load_bucket(self, payload, entries: list) -> tuple[int, int, int]:
        """One bucket: the flat tensor in `payload`, split into the (name, shape) `entries` (HF names).
        Returns the fingerprint of the bucket as it arrived here (vLLM's fused, repacked weights cannot be
        read back as the learner's tensors)."""
        flat = bucket_tensor(payload)
        self.model_runner.get_model().load_weights(iter(split_bucket(flat, [(n, tuple(s)) for n, s in entries])))
        return fingerprint(flat)

    def rlhf_finish_sync(self) -> None:
        from vllm.model_executor.model_loader.reload.layerwise import (
            finalize_layerwise_reload,  # deferred: loading vllm takes seconds
        )

        finalize_layerwise_reload(self.model_runner.get_model(), self.model_runner.vllm_config.model_config)
