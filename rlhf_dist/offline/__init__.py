"""Offline training stages (SFT, reward model, DPO, KTO): Ray Train jobs with DeepSpeed through one skeleton."""
