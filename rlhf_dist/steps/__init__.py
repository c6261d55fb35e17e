"""One process, one model: the forwards that give log-probs and values (`forwards`), the record the update
reads (`records`), the policy and value update over a mini-batch (`update`), and the SFT, reward-model,
DPO and KTO losses over a batch (`sft`, `reward`, `dpo`, `kto`). Imports only `algo/`, the model, packing and attention
code and the data records; the Ray actors (`roles/`), the Ray Train job (`offline/`) and DeepSpeed wrap
these, and tests run them alone on a CPU."""
