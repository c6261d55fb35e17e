"""Offline training stages (SFT, reward model, DPO): Ray Train jobs with DeepSpeed through one skeleton."""
