"""Weight quantization: round-to-nearest int8/int4 (rtn.py), the quantized linear layer (linear.py) and the
quantized checkpoint format (format.py)."""

BITS = (4, 8)
"""Bits per weight round-to-nearest supports."""
GROUP_SIZES = (32, 64, 128)
"""Group lengths along K (None: one group per output channel)."""
