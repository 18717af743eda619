"""Source formats streamq reads by dequantizing them tensor by tensor: see `base.Dequantizer`."""

from .base import Dequantizer, LogicalTensor, dequantizer_for, logical_checkpoint

__all__ = ["Dequantizer", "LogicalTensor", "dequantizer_for", "logical_checkpoint"]
