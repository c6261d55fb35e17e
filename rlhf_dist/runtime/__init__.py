"""Process-level plumbing shared by every learner: DeepSpeed engines, torch.distributed, the failure classes."""
