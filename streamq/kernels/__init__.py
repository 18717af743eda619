"""Quantization kernels that reproduce bitsandbytes' output bit for bit, only faster."""
