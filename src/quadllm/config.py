"""The configuration object: everything that decides what a quantization run does.

A :class:`QuantConfig` is built from CLI flags or by hand, validated once, and saved
with every checkpoint and result, so that a run can be reproduced from its output.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import QuadllmError

METHODS = ("quad", "quarot", "rtn")
MODES = ("w4a4", "w4a4a8", "w4a8", "w4a16")
WEIGHT_ALGOS = ("gptq", "gptaq", "rtn")
KV_BITS = (16, 8, 4)
MOMENTS = ("raw", "normalized")
LEARN_LOSSES = ("token", "mse")  # what --a-clip-learn minimizes (quadllm.core.clipping.block_error)
#: the outlier rank of ``--method quad`` unless given
DEFAULT_RANK = 64
OBSOLETE_KEYS = frozenset({"dtype"})  # configuration keys this version ignores when reading a checkpoint
#: configuration keys that checkpoints made before them lack, with the value those were made with
RECORDED_BEFORE_KEYS = {"gptaq_alpha": 1.0, "a_clip_search": False, "act_sym": True, "o_rank": 0,
                        "down_smooth": 0.0, "down_rank": 0, "a_clip_learn": 0,
                        "a_clip_learn_loss": "mse", "learn_transform": 0, "w_clip_learn": 0,
                        "o_rank_bits": 16, "overrides": ()}
#: what ``--method quad`` at W4A4 does unless told otherwise: the combination of accuracy techniques
#: without run-time cost that did best in the ablation (results/smollm2_ablation_final.md); the
#: baselines (quarot, rtn) and the other modes keep them off (:data:`RECIPE_OFF`)
QUAD_RECIPE = {"a_clip_search": True, "o_rank": 8, "down_smooth": 0.5}
RECIPE_OFF = {"a_clip_search": False, "o_rank": 0, "down_smooth": 0.0}
#: the modes :data:`QUAD_RECIPE` applies to by default
RECIPE_MODES = ("w4a4",)


class ConfigError(QuadllmError, ValueError):
    """A configuration that cannot be run, with the reason."""


def check_choice(name: str, value: Any, allowed: tuple) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(str, allowed))}")


@dataclass(frozen=True)
class ActSpec:
    """How the input activations of one linear layer are quantized (per token, dynamic; symmetric,
    or ``sym=False``: asymmetric with a zero point)."""

    bits: int = 16
    clip_ratio: float = 1.0
    sym: bool = True
    # the first ``rank`` input columns (QUAD's outlier columns): full precision, or (8) INT8 per token
    # with INT8 weights per output channel, ResQ's middle precision (``--o-rank-bits 8``)
    outlier_bits: int = 16

    @property
    def enabled(self) -> bool:
        return self.bits < 16


#: the Python types each annotation of :class:`QuantConfig` accepts
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,), "int": (int,), "float": (float, int), "bool": (bool,), "int | None": (int,),
    "bool | None": (bool,), "float | None": (float, int),
    "str | None": (str, type(None)), "dict[str, Any]": (dict,), "list[str]": (list,),
}


#: the activation bits a module setting may ask for
MODULE_ACT_BITS = (4, 8, 16)
#: the names a module setting may have besides ``w<W>a<A>`` / ``a<A>``: full precision
FULL_PRECISION_SETTINGS = ("skip", "fp")


@dataclass(frozen=True)
class ModuleSetting:
    """The treatment of one decoder linear: INT weights or full precision, and its activation bits
    (16: not quantized). The default comes from the mode; ``--override`` changes it per module."""

    weights: bool = True
    act_bits: int = 4

    def name(self, w_bits: int) -> str:
        """``fp``, or ``w<W>a<A>`` (``w4a16``: weight-only)."""
        return f"w{w_bits}a{self.act_bits}" if self.weights else "fp"


def parse_setting(text: str, w_bits: int) -> ModuleSetting:
    """A module setting from its name: ``skip`` / ``fp`` (full precision), ``a4`` / ``a8`` / ``a16``
    (activation bits, INT weights), or ``w<W>a<A>`` with W the run's ``--w-bits``."""
    t = text.strip().lower()
    if t in FULL_PRECISION_SETTINGS or t == "w16a16":
        return ModuleSetting(weights=False, act_bits=16)
    m = re.fullmatch(r"(?:w(\d+))?a(\d+)", t)
    if m is None:
        raise ConfigError(f"module setting {text!r}: expected skip, fp, a4, a8, a16 or w{w_bits}a4/w{w_bits}a8/"
                          f"w{w_bits}a16")
    w, a = m.group(1), int(m.group(2))
    if w is not None and int(w) != w_bits:
        raise ConfigError(f"module setting {text!r}: weights are INT{w_bits} in this run (--w-bits); a module "
                          f"takes INT{w_bits} weights or full precision (skip)")
    if a not in MODULE_ACT_BITS:
        raise ConfigError(f"module setting {text!r}: activations at {a} bits; expected one of "
                          f"{', '.join(map(str, MODULE_ACT_BITS))}")
    return ModuleSetting(weights=True, act_bits=a)


@dataclass(frozen=True)
class RankSetting:
    """A per-module rank (``rank<N>``) where a linear has its own: o_proj's principal coordinates of
    the values per head (``o_rank``), down_proj's input subspace (``down_rank``)."""

    rank: int


#: the roles of the linears a rank setting applies to
RANK_ROLES = ("o_proj", "down_proj")


def parse_override(text: str, w_bits: int) -> tuple[str, ModuleSetting | RankSetting]:
    """``PATTERN=SETTING`` split and checked: the pattern (a glob, or a regular expression after
    ``re:``) compiles, the setting parses (a precision, :func:`parse_setting`, or ``rank<N>``)."""
    pattern, sep, setting = str(text).rpartition("=")
    if not sep or not pattern.strip():
        raise ConfigError(f"override {text!r}: expected PATTERN=SETTING, e.g. '*.down_proj=a8' or "
                          "'layers.0.*=skip'")
    pattern = pattern.strip()
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as exc:
            raise ConfigError(f"override {text!r}: not a regular expression ({exc})") from None
    rank = re.fullmatch(r"rank(\d+)", setting.strip().lower())
    if rank is not None:
        return pattern, RankSetting(int(rank.group(1)))
    try:
        return pattern, parse_setting(setting, w_bits)
    except ConfigError as exc:
        raise ConfigError(f"{exc}, or rank<N> (o_proj's per head, down_proj's)") from None


def module_key(index: int, name: str) -> str:
    """The name overrides match: ``layers.<index>.<linear>`` (e.g. ``layers.3.mlp.down_proj``)."""
    return f"layers.{index}.{name}"


def pattern_matches(pattern: str, key: str) -> bool:
    """Whether an override's pattern names the module ``key`` (:func:`module_key`), also when written
    with the backbone's prefix (``model.layers.3.mlp.down_proj``); ``re:`` patterns match in full."""
    names = (key, f"model.{key}")
    if pattern.startswith("re:"):
        return any(re.fullmatch(pattern[3:], n) for n in names)
    return any(fnmatch.fnmatchcase(n, pattern) for n in names)


@dataclass
class QuantConfig:
    """What a quantization run will do.

    ``method``: ``quad`` (outlier subspace of rank ``rank`` kept in full precision, plus
    Hadamard rotations), ``quarot`` (the same pipeline with rank 0), ``rtn`` (no rotation,
    no decomposition: plain round-to-nearest, the naive baseline).
    ``mode``: which activations are quantized to how many bits (weights are always INT4):
    ``w4a4`` everything at 4 bits; ``w4a4a8`` o_proj and down_proj inputs at 8 bits;
    ``w4a8``; ``w4a16`` (weight-only).
    """

    method: str = "quad"
    rank: int | None = None  # None: DEFAULT_RANK for quad, 0 otherwise
    mode: str = "w4a4"
    weights: str = "gptq"
    gptaq_alpha: float = 0.25  # GPTAQ: share of the asymmetric correction W(C H⁻¹ - I) applied (its authors' 0.25)
    w_bits: int = 4
    group_size: int = 0  # 0: per output channel
    w_clip: bool = True  # MSE clipping search for weight scales
    w_clip_learn: int = 0  # steps training the weight clip ratios per layer against its float output (0: off)
    act_order: bool = False
    damp: float = 0.01
    gptq_block: int = 128
    true_sequential: bool = True  # GPTQ: re-run the layer after each group of linears
    a_clip: float = 0.9
    # None (these three): QUAD_RECIPE's value for --method quad in RECIPE_MODES, RECIPE_OFF's otherwise
    a_clip_search: bool | None = None  # search each linear input's clip ratio on the calibration data
    a_clip_learn: int = 0  # steps training every layer's clip ratios jointly against its float output (0: off)
    a_clip_learn_loss: str = "token"  # the error it minimizes: per token relative to its norm, or plain MSE
    learn_transform: int = 0  # steps training an affine transform of every quantized input per layer (0: off)
    act_sym: bool = True  # per-token activations symmetric (False: asymmetric, a zero point per token)
    o_rank: int | None = None  # top principal coordinates of each KV head's values kept in full precision in o_proj
    o_rank_bits: int = 16  # those coordinates in full precision (16) or at INT8, inputs and weights (8: ResQ's)
    down_smooth: float | None = None  # SmoothQuant alpha of down_proj's input channel scales (0: off)
    down_rank: int = 0  # top principal coordinates of each down_proj input kept in full precision (online)
    kv_bits: int = 16
    kv_clip: float = 1.0
    moment: str = "raw"  # how the residual second moment weights tokens
    calib: str | None = None
    calib_samples: int = 32
    calib_seqlen: int = 512
    calib_batch: int = 8
    seed: int = 0
    # PATTERN=SETTING per decoder linear (quadllm.config.parse_override), the last match wins
    overrides: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not (self.rank is None or isinstance(self.rank, int)):
            raise ConfigError(f"method={self.method!r} / rank={self.rank!r}: a name and an integer are expected")
        if self.method in ("quarot", "rtn"):
            if self.rank not in (None, 0):
                raise ConfigError(f"--method {self.method} means rank 0; use --method quad for rank {self.rank}")
            self.rank = 0
        elif self.rank is None:
            self.rank = DEFAULT_RANK
        if isinstance(self.overrides, tuple):
            self.overrides = list(self.overrides)
        self.resolve_recipe()
        self.validate()

    def resolve_recipe(self) -> None:
        """Fill the fields left ``None`` from :data:`QUAD_RECIPE` (``--method quad`` in
        :data:`RECIPE_MODES`) or :data:`RECIPE_OFF`. A quantized KV cache stores the values that
        ``o_rank`` would rotate, and its full-precision columns leave a count of quantized o_proj inputs
        that weight groups need not divide, so the default o_rank is 0 with either."""
        on = self.method == "quad" and self.mode in RECIPE_MODES
        for key, value in (QUAD_RECIPE if on else RECIPE_OFF).items():
            if getattr(self, key) is None:
                o_off = key == "o_rank" and (self.kv_bits != 16 or self.group_size != 0)
                setattr(self, key, RECIPE_OFF[key] if o_off else value)

    def check_types(self) -> None:
        """Every field has its declared type (bool is not an int here): a configuration read from a
        damaged file fails with the field's name, not deep inside the pipeline."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            allowed = _FIELD_TYPES[f.type] if isinstance(f.type, str) else (f.type,)
            if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
                raise ConfigError(f"{f.name}={value!r} is not of type {f.type}")

    def validate(self) -> None:
        self.check_types()
        choice = check_choice
        choice("method", self.method, METHODS)
        choice("mode", self.mode, MODES)
        choice("weights", self.weights, WEIGHT_ALGOS)
        choice("kv_bits", self.kv_bits, KV_BITS)
        choice("moment", self.moment, MOMENTS)
        choice("a_clip_learn_loss", self.a_clip_learn_loss, LEARN_LOSSES)
        if self.rank < 0:
            raise ConfigError(f"rank must be >= 0, got {self.rank}")
        if self.a_clip_learn < 0:
            raise ConfigError(f"a_clip_learn (training steps per layer) must be >= 0, got {self.a_clip_learn}")
        if self.learn_transform < 0:
            raise ConfigError(f"learn_transform (training steps per layer) must be >= 0, got {self.learn_transform}")
        if self.w_clip_learn < 0:
            raise ConfigError(f"w_clip_learn (training steps per layer) must be >= 0, got {self.w_clip_learn}")
        if self.down_rank < 0 or self.o_rank < 0:
            raise ConfigError(f"down_rank and o_rank must be >= 0, got {self.down_rank} and {self.o_rank}")
        if not 0.0 <= self.down_smooth < 1.0:
            raise ConfigError(f"down_smooth (a SmoothQuant alpha) must be in [0, 1), got {self.down_smooth}")
        if self.o_rank_bits not in (16, 8):
            raise ConfigError(f"o_rank_bits must be 16 (full precision) or 8 (INT8), got {self.o_rank_bits}")
        if self.o_rank_bits < 16 and not self.o_rank:
            raise ConfigError("o_rank_bits 8 sets the precision of o_proj's principal coordinates: it needs o_rank > 0")
        if self.o_rank and self.kv_bits < 16:
            raise ConfigError("o_rank rotates the values to their principal coordinates, which a quantized KV "
                              "cache would then store unrotated; use kv_bits 16 with o_rank")
        if self.w_bits not in (2, 3, 4, 8):
            raise ConfigError(f"w_bits must be 2, 3, 4 or 8, got {self.w_bits}")
        if self.group_size < 0:
            raise ConfigError(f"group_size must be >= 0 (0 = per channel), got {self.group_size}")
        if not 0.0 <= self.gptaq_alpha <= 1.0:
            raise ConfigError(f"gptaq_alpha must be in [0, 1], got {self.gptaq_alpha}")
        if not 0.0 < self.a_clip <= 1.0:
            raise ConfigError(f"a_clip must be in (0, 1], got {self.a_clip}")
        if not 0.0 < self.kv_clip <= 1.0:
            raise ConfigError(f"kv_clip must be in (0, 1], got {self.kv_clip}")
        if self.calib_samples < 1 or self.calib_seqlen < 8:
            raise ConfigError("calib_samples must be >= 1 and calib_seqlen >= 8")
        self.parsed_overrides()

    def check_model_sizes(self, hidden_size: int, intermediate_size: int | None = None,
                          head_dim: int | None = None) -> None:
        """The checks that need the model: the rank must fit in its hidden size, the down_proj
        rank in its intermediate size, the o_proj rank in its head dimension."""
        if self.rank > hidden_size:
            raise ConfigError(f"rank {self.rank} is larger than the hidden size {hidden_size}")
        if intermediate_size is not None and self.down_rank >= intermediate_size:
            raise ConfigError(f"down_rank {self.down_rank} must be smaller than the intermediate size "
                              f"{intermediate_size}")
        if head_dim is not None and self.o_rank >= head_dim:
            raise ConfigError(f"o_rank {self.o_rank} must be smaller than the head dimension {head_dim}")

    # --- derived ---------------------------------------------------------------------------
    @property
    def rotate(self) -> bool:
        """Hadamard rotations (the residual basis and the online transforms)."""
        return self.method in ("quad", "quarot")

    @property
    def residual_transform(self) -> bool:
        """Whether the residual stream moves to a new basis (rotated, expanded by the rank, or both)."""
        return self.rotate or self.rank > 0

    @property
    def needs_layer_inputs(self) -> bool:
        """Whether each decoder layer's calibration inputs are needed: for GPTQ or GPTAQ, the clip search,
        the o_proj and down_proj subspaces, the learned transforms or the learned weight clips."""
        return (self.weights != "rtn" or self.stores_act_clips or self.down_rank > 0 or self.o_rank > 0
                or any(isinstance(s, RankSetting) and s.rank > 0 for _, s in self.parsed_overrides())
                or self.down_smooth > 0 or self.learns_transforms or self.w_clip_learn > 0)

    @property
    def quantizes_activations(self) -> bool:
        """Whether some linear's activations are quantized: by the mode, or by an override."""
        return self.mode != "w4a16" or any(isinstance(s, ModuleSetting) and s.act_bits < 16
                                           for _, s in self.parsed_overrides())

    @property
    def searches_act_clips(self) -> bool:
        """Whether the activation clip ratios are searched (some activations are quantized)."""
        return self.a_clip_search and self.quantizes_activations

    @property
    def learns_act_clips(self) -> bool:
        """Whether the activation clip ratios are trained block by block (some activations are quantized)."""
        return self.a_clip_learn > 0 and self.quantizes_activations

    @property
    def learns_transforms(self) -> bool:
        """Whether every quantized input gets a learned affine transform (some activations are quantized)."""
        return self.learn_transform > 0 and self.quantizes_activations

    @property
    def stores_act_clips(self) -> bool:
        """Whether each linear holds its own clip ratio (searched, learned or both)."""
        return self.searches_act_clips or self.learns_act_clips

    @property
    def needs_calibration(self) -> bool:
        """Whether the run needs calibration samples: for an outlier subspace, GPTQ or the clip search."""
        return self.rank > 0 or self.needs_layer_inputs

    def parsed_overrides(self) -> list[tuple[str, ModuleSetting | RankSetting]]:
        """``overrides`` as (pattern, setting) pairs, in order (checked: a bad one raises ConfigError)."""
        for text in self.overrides:
            if not isinstance(text, str):
                raise ConfigError(f"overrides: expected PATTERN=SETTING strings, got {text!r}")
        return [parse_override(text, self.w_bits) for text in self.overrides]

    def module_setting(self, role: str, module: str | None = None) -> ModuleSetting:
        """The treatment of a linear of the given role (``reader`` of the residual stream, ``o_proj``
        or ``down_proj``): the mode's, or that of the last override whose pattern names ``module``
        (:func:`module_key`)."""
        if module is not None:
            for pattern, setting in reversed(self.parsed_overrides()):
                if isinstance(setting, ModuleSetting) and pattern_matches(pattern, module):
                    return setting
        main = {"w4a4": 4, "w4a4a8": 4, "w4a8": 8, "w4a16": 16}[self.mode]
        return ModuleSetting(act_bits=8 if (self.mode == "w4a4a8" and role in ("o_proj", "down_proj")) else main)

    def module_rank(self, role: str, module: str | None = None) -> int:
        """The rank of a linear that has its own (:data:`RANK_ROLES`: ``o_rank`` for o_proj,
        ``down_rank`` for down_proj): the configuration's, or that of the last ``rank<N>`` override
        whose pattern names ``module``; 0 for the other roles."""
        if role not in RANK_ROLES:
            return 0
        if module is not None:
            for pattern, setting in reversed(self.parsed_overrides()):
                if isinstance(setting, RankSetting) and pattern_matches(pattern, module):
                    return setting.rank
        return self.o_rank if role == "o_proj" else self.down_rank

    def act_spec(self, role: str, module: str | None = None) -> ActSpec:
        """Activation quantization for a linear of the given role (``reader`` of the residual
        stream, ``o_proj`` or ``down_proj``) and name (:meth:`module_setting`)."""
        bits = self.module_setting(role, module).act_bits
        outlier = self.o_rank_bits if role == "o_proj" and bits < 16 else 16
        return ActSpec(bits=bits, clip_ratio=self.a_clip if bits < 16 else 1.0, sym=self.act_sym or bits >= 16,
                       outlier_bits=outlier)

    # --- persistence -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"a configuration must be an object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        data = {**RECORDED_BEFORE_KEYS, **{k: v for k, v in data.items() if k not in OBSOLETE_KEYS}}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown configuration keys: {sorted(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def learned_clip_description(self) -> str:
        if not self.learns_act_clips:
            return ""
        return f" then learned per layer ({self.a_clip_learn} steps, {self.a_clip_learn_loss} error)"

    def describe(self) -> str:
        """One line saying what will happen."""
        rot = {"quad": f"QUAD rank {self.rank} + Hadamard", "quarot": "QuaRot (Hadamard, rank 0)",
               "rtn": "no rotation (plain RTN baseline)"}[self.method]
        grp = f"group {self.group_size}" if self.group_size else "per-channel"
        return (f"{rot}; {self.mode}; weights INT{self.w_bits} {self.weights.upper()} {grp}"
                f"{' act-order' if self.act_order else ''}"
                f"{f', clip learned per layer ({self.w_clip_learn} steps)' if self.w_clip_learn else ''}"
                "; activations clip "
                f"{'searched per input' if self.searches_act_clips else self.a_clip}"
                f"{self.learned_clip_description()}"
                f"{'' if self.act_sym else ', asymmetric'}; "
                f"{f'o_proj input rank {self.o_rank} per head' if self.o_rank else ''}"
                f"{' at INT8' if self.o_rank and self.o_rank_bits < 16 else ''}{'; ' if self.o_rank else ''}"
                f"{f'down_proj input smoothed (alpha {self.down_smooth}); ' if self.down_smooth else ''}"
                f"{f'down_proj input rank {self.down_rank} (online); ' if self.down_rank else ''}"
                f"{f'learned transforms ({self.learn_transform} steps per layer, online); ' if self.learns_transforms else ''}"
                f"{f'{len(self.overrides)} per-module override(s); ' if self.overrides else ''}"
                f"KV {self.kv_bits}-bit; calibration {self.calib_samples}x{self.calib_seqlen} "
                f"tokens from {self.calib or 'the embedded default'}; seed {self.seed}")
