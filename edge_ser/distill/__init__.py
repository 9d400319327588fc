"""Dataset distillation: turn a corpus into a few synthetic samples per class for one fixed init θ0.

Each method's settings are a typed, frozen dataclass (:mod:`.settings`); ``known_params(method)`` lists its keys
and defaults, ``validate_params(method, params)`` refuses an unknown key at once, ``preset("demo")`` is a
demo-size run of the default method.
"""
from .base import DEFAULT_METHOD, METHODS, DistillConfig, SyntheticSet, distill
from .settings import known_params, params_help, preset, settings_for, validate_params

__all__ = ["DEFAULT_METHOD", "METHODS", "DistillConfig", "SyntheticSet", "distill", "known_params", "params_help",
           "preset", "settings_for", "validate_params"]
