"""Model layer: loading HF models, attention for packed rows, packing, precision."""
