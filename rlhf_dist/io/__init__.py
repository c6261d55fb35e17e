"""Storage and reporting: the checkpoint layout and atomic writes, run logs and metrics files with W&B, the report."""
