"""rlhf-dist: distributed RLHF (SFT -> reward model -> PPO) on Ray with DeepSpeed."""

__version__ = "0.1.0"
__all__ = ["RLHFConfig", "RLHFPipeline", "create_rlhf_pipeline", "load_config"]


def __getattr__(name):
    # Lazy, so that `import rlhf_dist.algo` (pure torch) pulls in nothing else.
    if name in ("RLHFPipeline", "create_rlhf_pipeline"):
        from . import pipeline

        return getattr(pipeline, name)
    if name in ("RLHFConfig", "load_config"):
        from . import config

        return getattr(config, name)
    raise AttributeError(name)
