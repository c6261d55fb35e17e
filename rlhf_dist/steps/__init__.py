"""One process, one model: the forwards that give log-probs and values (`forwards`), the record the update
reads (`records`), and the policy and value update over a mini-batch (`update`). Imports only `algo/`, the
model, packing and attention code; the Ray actors (`roles/`) and DeepSpeed wrap these, and tests run them
alone on a CPU."""
