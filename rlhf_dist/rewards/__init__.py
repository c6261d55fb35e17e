"""Reward sources: the reward model (`model`), a Python function (`function`) and an HTTP server (`http`),
each scoring a batch of prompts and responses with a score and an outcome per sample (`base`), combined
with their weights (`sources`). Their table is `config/rewards.py`. The reward role (roles/actors.py) and
`rlhf-dist eval` score through them; they import `steps/` and below, never Ray."""
