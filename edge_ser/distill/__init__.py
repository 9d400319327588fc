"""Dataset distillation: turn a corpus into a few synthetic samples per class for one fixed init θ0."""
from .base import DEFAULT_METHOD, METHODS, DistillConfig, SyntheticSet, distill

__all__ = ["DEFAULT_METHOD", "METHODS", "DistillConfig", "SyntheticSet", "distill"]
