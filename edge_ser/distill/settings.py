"""Typed, frozen settings for every distillation method: one field per knob, each with its reason.

``DistillConfig.params`` (``edge-ser pack --param KEY=VALUE``) holds a method's overrides; they become one of
these classes when the config is built, so a misspelt key fails at once, listing the keys the method knows,
instead of running a long distillation on defaults. Values are coerced to the field's type (``--param
epoch_grid=120`` is the tuple ``(120,)``, ``expert_lr=1`` the float ``1.0``), and choices are checked.

>>> FixedInitSettings.from_params({"epoch_grid": 120}).epoch_grid
(120,)
>>> validate_params("fixed-init", {"epoch_gird": (80,)})  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: unknown fixed-init setting 'epoch_gird'; known: experts, expert_epochs, ...
>>> sorted(known_params("dm"))[:3]
['batch_real', 'batch_size', 'epochs']
"""

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple, Union

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _coerce(name: str, kind, value):
    """``value`` as the annotated type ``kind`` (int, float, bool, str, Optional[...], Union[float, str],
    Tuple[X, ...]); a clear ValueError naming the setting otherwise."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(name, option, value)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[-1] if errors else f"setting {name!r}: bad value {value!r}")
    if origin is tuple:
        items = value if isinstance(value, (tuple, list)) else (value,)
        return tuple(_coerce(name, args[0], v) for v in items)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ValueError(f"setting {name!r} wants true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise ValueError(f"setting {name!r} wants a whole number, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"setting {name!r} wants a whole number, got {value!r}") from None
        if not f.is_integer():
            raise ValueError(f"setting {name!r} wants a whole number, got {value!r}")
        return int(f)
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(f"setting {name!r} wants a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"setting {name!r} wants a number, got {value!r}") from None
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"setting {name!r} wants a word, got {value!r}")
        return value
    raise TypeError(f"setting {name!r}: unsupported type {kind!r}")


def _choice(settings, name: str, allowed) -> None:
    value = getattr(settings, name)
    if value not in allowed:
        raise ValueError(f"{settings.method} {name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


@dataclass(frozen=True)
class MethodSettings:
    """Base: type coercion at construction, ``from_params`` that refuses unknown keys, introspection."""

    method: ClassVar[str] = ""
    default_iterations: ClassVar[int] = 0      # outer iterations when DistillConfig.iterations is None

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, hints[f.name], getattr(self, f.name)))
        self.check()

    def check(self) -> None:
        """Method-specific checks of choices and ranges (overridden)."""

    @classmethod
    def from_params(cls, params: Union[Mapping[str, Any], Tuple[Tuple[str, Any], ...], None] = None):
        """The settings with ``params`` (a mapping or (key, value) pairs) overriding the defaults."""
        params = dict(params or ())
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in params if k not in known]
        if unknown:
            label = "settings" if len(unknown) > 1 else "setting"
            raise ValueError(f"unknown {cls.method} {label} {', '.join(map(repr, unknown))}; "
                             f"known: {', '.join(known)}")
        return cls(**params)

    @classmethod
    def defaults(cls) -> Dict[str, Any]:
        """Every key this method takes, with its default, in declaration order."""
        return {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}

    def overrides(self) -> Dict[str, Any]:
        """The fields that differ from the defaults (what ``--param`` would have to say)."""
        base = type(self)()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(base, f.name)}


# -------------------------------------------------------------------------------------------- fixed-init

@dataclass(frozen=True)
class FixedInitSettings(MethodSettings):
    """Fixed-initialisation trajectory matching (the product default); see ``fixed_init.py`` for the method."""

    method: ClassVar[str] = "fixed-init"
    default_iterations: ClassVar[int] = 40  # on RAVDESS the best set came at iteration 10-40 in every run

    # 1. experts: full-data runs that all start at θ0
    experts: int = 2                    # trajectories to match; more barely moved the result, each costs a full fit
    expert_epochs: int = 15             # epochs per expert, each saved; the segments matched lie in the first ~10
    expert_optimizer: str = "sgd"       # "sgd": the optimiser the student and device use; "adam": the paper's recipe
    expert_lr: Optional[float] = None   # None: 0.3 for sgd, 1e-3 for adam (EXPERT_LR)
    # 2. the starting set
    init_select: str = "herding"        # "herding" (experts' embedding), "random" real clips, "mixture" (no real clip)
    mix_clips: int = 8                  # "mixture": same-class clips (one per speaker) averaged into each sample
    gauss_rank: int = 16                # "gaussian": principal directions per class the samples vary along
    teacher_labels: bool = False        # label clips with the experts' softened predictions instead of the class
    temperature: float = 2.0            # softening of teacher_labels
    # 3. trajectory matching
    max_start_epoch: int = 8            # latest expert epoch a segment starts at
    p_theta0: float = 0.3               # share of segments that start at θ0 itself (the device always does)
    expert_epochs_ahead: int = 1        # M: the segment's target is the expert M epochs later
    syn_steps: int = 4                  # student SGD steps unrolled per segment
    anchor: str = "expert"              # "expert": start at the expert's θ_t; "student": on the device's own path
    path_every: int = 5                 # anchor="student": iterations between recomputing the device's path
    augment: bool = True                # the device's shift and masks inside the unrolled steps (IPC 1: +5-10 points)
    lr_init: float = 0.05               # the learnable step size's start
    lr_img: float = 0.03                # Adam rate of the clips (in the normalised input space)
    lr_lr: float = 0.01                 # Adam rate of the log step size
    lr_label: float = 0.05              # Adam rate of learned labels (DistillConfig.soft_labels)
    # 4. selection and the device's recipe
    select_on: str = "val_train"        # "val_train": mean UAR of validation and training speakers (steadier); "val"
    select_train_max: int = 2000        # training clips scored at most (a large corpus: a fixed random share)
    val_speakers: int = 2               # speakers held out of the training set when no validation set is given
    eval_every: int = 10                # iterations between scoring the current set
    eval_epochs: int = 150              # epochs of the device's recipe in every such score
    eval_lr: Union[float, str] = 0.2    # their step size, or "learned" (the current learned one)
    device_augment: bool = True         # the device rolls and masks clips in every epoch (implied by augment)
    shift: float = 0.2                  # the device's largest time shift, as a share of the clip's frames
    batch: int = 16                     # the device's mini-batch (0: the whole set in every step)
    decay: str = "cosine"               # the device's step-size decay, "cosine" (ends every run settled) or "none"
    lr_factors: Tuple[float, ...] = (1.0,)                  # the schedule tries the learned step size times these
    lr_grid: Tuple[float, ...] = (0.1, 0.2, 0.4)            # and these fixed step sizes
    epoch_grid: Tuple[int, ...] = (100, 150, 200)           # for each of these epoch counts (12 device trainings)
    robust_schedule: bool = False       # let the real-subset recipe (Adam, ~300 steps) compete for the schedule
    robust_steps: int = 300             # robust_schedule: its optimiser steps
    robust_lr: float = 1e-3             # robust_schedule: its Adam rate
    robust_batch: int = 64              # robust_schedule: its mini-batch (full batch below that)

    def check(self) -> None:
        _choice(self, "expert_optimizer", ("sgd", "adam"))
        _choice(self, "init_select", ("herding", "random", "mixture", "gaussian"))
        _choice(self, "anchor", ("expert", "student"))
        _choice(self, "select_on", ("val", "val_train"))
        _choice(self, "decay", ("none", "cosine"))
        if isinstance(self.eval_lr, str) and self.eval_lr != "learned":
            raise ValueError(f"fixed-init eval_lr must be a number or 'learned', got {self.eval_lr!r}")
        if self.anchor == "student" and self.augment:
            raise ValueError("fixed-init: anchor='student' needs augment=False (its path is not augmented)")
        if not self.epoch_grid or min(self.epoch_grid) < 1:
            raise ValueError(f"fixed-init epoch_grid needs epoch counts >= 1, got {self.epoch_grid!r}")
        if not (self.lr_factors or self.lr_grid):
            raise ValueError("fixed-init needs a step size to try: lr_factors and lr_grid are both empty")

    @classmethod
    def demo(cls) -> "FixedInitSettings":
        """A demo-size run of the same method (with ``DEMO_ITERATIONS``): one 4-epoch expert, 1-step unrolls (each
        unrolled step's second-order graph costs ~300 MB), scoring at the start and the end only with 20-epoch runs,
        at most 200 training clips scored, and one 40-epoch device training at 0.2 for the schedule instead of
        choosing among 9: a minute or two on a 2-core CPU instead of a quarter of an hour."""
        return cls(experts=1, expert_epochs=4, max_start_epoch=2, syn_steps=1, eval_every=100, eval_epochs=20,
                   lr_factors=(), lr_grid=(0.2,), epoch_grid=(40,), select_train_max=200)


#: distillation iterations of the demo preset (enough to show trajectory matching at work; scored at 0 and the end)
DEMO_ITERATIONS = 2

#: named presets: ``pack(..., **preset("demo"))`` or ``edge-ser pack --iterations N --param KEY=VALUE ...``
PRESETS: Dict[str, Dict[str, Any]] = {
    "demo": {"method": "fixed-init", "iterations": DEMO_ITERATIONS, "params": FixedInitSettings.demo().overrides()},
}


def preset(name: str) -> Dict[str, Any]:
    """Keyword arguments for ``edge_ser.packer.pack`` (method, iterations, params) of a named preset.

    >>> preset("demo")["iterations"]
    2
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    p = PRESETS[name]
    return {"method": p["method"], "iterations": p["iterations"], "params": dict(p["params"])}


# ---------------------------------------------------------------------------------------------------- MTT

@dataclass(frozen=True)
class MTTSettings(MethodSettings):
    """Matching Training Trajectories (Cazenavette et al. 2022) as Chang et al. (2025) use it for speech."""

    method: ClassVar[str] = "mtt"
    default_iterations: ClassVar[int] = 60  # as in the paper

    experts: int = 2                    # expert runs from random initialisations
    expert_epochs: int = 20             # epochs per expert, each saved
    expert_optimizer: str = "adam"      # the paper's experts; "sgd" is the original MTT recipe
    expert_lr: float = 1e-3             # the experts' rate
    max_start_epoch: int = 10           # latest expert epoch a segment starts at (paper 30; our experts are shorter)
    expert_epochs_ahead: int = 2        # M epochs between a segment's start and target (paper 3)
    syn_steps: int = 10                 # student steps unrolled per segment (paper 20, a CPU budget here)
    batch_syn: int = 16                 # student mini-batch (0: the whole set)
    lr_init: float = 1e-2               # the learnable step size's start (above 1e-3: SGD must cover an Adam epoch)
    lr_lr: float = 1e-5                 # SGD rate of the step size
    lr_img: float = 100.0               # SGD rate of the clips (raw log-Mels in dB-like units; paper 1000 normalised)
    lr_label: float = 10.0              # SGD rate of learned label logits (DistillConfig.soft_labels)
    train_epochs: int = 100             # device epochs when not selected
    select_epochs: bool = True          # choose the device's epochs on the validation speakers
    epoch_grid: Tuple[int, ...] = (50, 100)   # the epoch counts select_epochs tries
    eval_every: int = 10                # iterations between scoring the current set
    val_speakers: int = 2               # speakers held out of the training set when no validation set is given

    def check(self) -> None:
        _choice(self, "expert_optimizer", ("sgd", "adam"))


# ---------------------------------------------------------------------------------------- DM, DC, coresets

@dataclass(frozen=True)
class PaperScheduleSettings(MethodSettings):
    """The DC/DM papers' evaluation recipe, shortened for a 2-core CPU (it is also the schedule a pack ships)."""

    lr: float = 0.01                    # SGD rate
    momentum: float = 0.9               # SGD momentum
    weight_decay: float = 5e-4          # L2 decay
    epochs: int = 200                   # DC: 300, DM: 1000 in the papers
    batch_size: int = 128               # mini-batch (the whole set below that)


@dataclass(frozen=True)
class DMSettings(PaperScheduleSettings):
    """Distribution Matching (Zhao & Bilen 2023); see ``dm.py``."""

    method: ClassVar[str] = "dm"
    default_iterations: ClassVar[int] = 200  # the paper runs 20 000 on GPUs

    lr_img: float = 1.0                 # SGD rate on the clips (momentum 0.5), in θ0's normalised input space
    batch_real: int = 32                # real utterances per class per iteration
    theta0_prob: float = 0.0            # share of iterations that embed with θ0 instead of a fresh random net
    eval_every: int = 0                 # iterations between validation scores (0: at the end only)
    teacher_epochs: int = 2             # soft labels: epochs of θ0 on real data for the teacher


@dataclass(frozen=True)
class DCSettings(PaperScheduleSettings):
    """Dataset Condensation by gradient matching (Zhao et al. 2021); see ``dc.py``."""

    method: ClassVar[str] = "dc"
    default_iterations: ClassVar[int] = 50   # the paper runs 1000

    lr_img: float = 0.1                 # SGD rate on the clips (momentum 0.5), in θ0's normalised input space
    lr_net: float = 0.01                # SGD rate of the network trained on the synthetic set
    batch_real: int = 32                # real utterances per class per matching step
    outer_loop: Optional[int] = None    # matching steps per network (None: the paper's by ipc, capped by max_outer)
    inner_loop: Optional[int] = None    # network steps between them (None: the paper's by ipc)
    max_outer: int = 5                  # cap of the paper's outer_loop, for a CPU budget
    theta0_prob: float = 0.0            # share of iterations that start from θ0 instead of a random init
    eval_every: int = 0                 # iterations between validation scores (0: at the end only)
    lr_label: float = 0.1               # SGD rate of learned label logits (DistillConfig.soft_labels)


@dataclass(frozen=True)
class CoresetSettings(MethodSettings):
    """Real-subset baselines (random, herding, k-center) and the schedule a device trains them with."""

    method: ClassVar[str] = "coreset"

    embed: str = "theta0"               # herding/k-center embedding: θ0's (BN re-estimated), or "trained" briefly
    embed_epochs: int = 2               # embed="trained": epochs on all training data
    lr: float = 1e-3                    # schedule: Adam rate (tuned on RAVDESS random subsets)
    steps: int = 300                    # schedule: about this many optimiser steps
    batch_size: int = 64                # schedule: mini-batch (the whole set below that)
    augment: bool = True                # schedule: SpecAugment on the real clips

    def check(self) -> None:
        _choice(self, "embed", ("theta0", "trained"))


#: method name -> its settings class
SETTINGS: Dict[str, type] = {
    "fixed-init": FixedInitSettings, "mtt": MTTSettings, "dc": DCSettings, "dm": DMSettings,
    "random": CoresetSettings, "herding": CoresetSettings, "kcenter": CoresetSettings,
}


def settings_for(method: str, params=None) -> MethodSettings:
    """The typed settings of ``method`` with ``params`` applied (a ValueError names an unknown key or bad value)."""
    if method not in SETTINGS:
        raise ValueError(f"unknown distillation method {method!r}; known: {', '.join(SETTINGS)}")
    cls = SETTINGS[method]
    try:
        return cls.from_params(params)
    except ValueError as e:
        msg = str(e).replace("coreset", method)
        raise ValueError(msg if msg.startswith(("unknown", method)) else f"{method}: {msg}") from None


def validate_params(method: str, params=None) -> None:
    """Raise ValueError at once when ``params`` has a key ``method`` does not know or a value it cannot take."""
    settings_for(method, params)


def known_params(method: str) -> Dict[str, Any]:
    """``{key: default}`` of every setting ``method`` takes (for ``--help`` and error messages)."""
    if method not in SETTINGS:
        raise ValueError(f"unknown distillation method {method!r}; known: {', '.join(SETTINGS)}")
    return SETTINGS[method].defaults()


def params_help(methods=None, width: int = 100) -> str:
    """Every method's ``--param`` keys with their defaults, wrapped for ``--help`` (one paragraph per method).

    >>> params_help(["random"]).splitlines()[0]
    'random: embed=theta0, embed_epochs=2, lr=0.001, steps=300, batch_size=64, augment=True'
    """
    import textwrap

    def show(v):
        return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)

    out = []
    for method in methods or SETTINGS:
        keys = ", ".join(f"{k}={show(v)}" for k, v in known_params(method).items())
        out.append(textwrap.fill(f"{method}: {keys}", width=width, subsequent_indent="  "))
    return "\n".join(out)
