"""The Recipe: plain data that fully describes a deployed model (contract calibrate -> build).

    name: str                    recipe name; artifacts go to graphs/<name>/
    model: str                   HF checkpoint folder (relative paths resolve against the CWD)
    quant: Quant                 scheme preset and/or weights / activations / kv_cache sections
    pruning: Pruning             budget, n_visual, stages [{layer, keep, weights, sigma}], tie, method
    calibration: Calibration | None
    export: Export

Every model is strict (`extra="forbid"`, no type coercion, no inf/nan). `load_recipe` turns any
problem into one `UserError` line: `<file>: <field.path>: <message>`. Checks that need the
model (layer count, visual tokens per image, module names) live in `Recipe.check_against`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import weakref
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from quota_export import UserError

_CONFIG = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, validate_default=True)


def _fail(msg: str, *subloc) -> PydanticCustomError:
    """A validation error whose field path is the model's location + `subloc` (see format_validation_error)."""
    return PydanticCustomError("quota_recipe", msg, {"subloc": subloc})


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _check_regexes(patterns: list[str]) -> list[str]:
    from quota_export.limits import MAX_PATTERN_CHARS

    for i, p in enumerate(patterns):
        if len(p) > MAX_PATTERN_CHARS:
            raise _fail(f"pattern of {len(p)} characters, more than the limit of {MAX_PATTERN_CHARS}", i)
        try:
            re.compile(p)
        except re.error as e:
            raise _fail(f"invalid regex {p!r}: {e}", i) from None
    return patterns


# ---------------------------------------------------------------- quant


class GPTQArgs(BaseModel):
    model_config = _CONFIG
    damp: float = 0.01  # added to diag(H): damp * mean(diag(H)); in (0, 1)
    block_size: int = Field(128, gt=0)  # lazy-update block width (columns)
    act_order: bool = False  # quantize columns by descending diag(H) (groups then are static)

    @field_validator("damp")
    @classmethod
    def _damp(cls, v: float) -> float:
        if not 0.0 < v < 1.0:
            raise _fail(f"damp {v} must be in (0, 1)")
        return v


DEFAULT_TARGETS = [r"^model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"]
DEFAULT_IGNORE = [r"lm_head", r"vision_tower", r"multi_modal_projector"]


class WeightQuant(BaseModel):
    """Weight quantization of the linears selected by `targets` minus `ignore`.

    Patterns are matched against module names (as `named_modules()` spells them) with
    `re.search`, so an unanchored pattern matches anywhere in the name.
    """

    model_config = _CONFIG
    bits: Literal[4, 8, 16]  # 16 = not quantized
    symmetric: bool = True
    granularity: Literal["channel", "group"] = "group"
    group_size: int = 32  # positive power of 2; ignored for granularity "channel"
    algorithm: Literal["rtn", "gptq"] = "rtn"
    gptq: GPTQArgs = GPTQArgs()
    # algorithm gptq: the weights file `calibrate --weights gptq` wrote beside the recipe
    # (a file name, relative to the recipe's folder; see qweights.py)
    calibrated: str | None = None
    # exact: with quantized activations, group scales are snapped to m * 2^e per row so the
    # quantized matmul sums exactly in fp32 in any order (graphs == reference bit for bit, see
    # quant/quantizers.py); float: free fp32 scales (parity then has rounding-order noise).
    accumulation: Literal["exact", "float"] = "exact"
    targets: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS))
    ignore: list[str] = Field(default_factory=lambda: list(DEFAULT_IGNORE))

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int) -> int:
        if not _is_pow2(v):
            raise _fail(f"group_size {v} must be a positive power of 2")
        return v

    @field_validator("targets", "ignore")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        return _check_regexes(v)

    @field_validator("calibrated")
    @classmethod
    def _calibrated(cls, v: str | None) -> str | None:
        if v is not None and (not v.endswith(".safetensors") or "/" in v or "\\" in v or v.startswith(".")):
            raise _fail(f"{v!r} must be the name of a .safetensors file beside the recipe (no folders)")
        return v

    @model_validator(mode="after")
    def _calibrated_needs_gptq(self) -> WeightQuant:
        if self.calibrated is not None and self.algorithm != "gptq":
            raise _fail(f"calibrated weights are read with algorithm gptq only, not {self.algorithm}", "calibrated")
        return self

    def group_size_for(self, in_features: int) -> int:
        """The group size actually used for a weight with `in_features` columns."""
        return in_features if self.granularity == "channel" else self.group_size

    def scale_bits_for(self, in_features: int, act_bits: int) -> int | None:
        """Bits of the snapped group scales (exact accumulation), or None for free fp32 scales."""
        if self.accumulation == "float" or act_bits >= 16 or self.bits >= 16:
            return None
        from quota_export.quant.quantizers import exact_scale_bits

        return exact_scale_bits(in_features, self.bits, self.symmetric, act_bits)

    def quantized(self, module_names: list[str]) -> list[str]:
        """Names (in the given order) of the modules whose weights are quantized; none if bits == 16."""
        return [] if self.bits == 16 else [n for n in module_names if self.selects(n)]

    def selects(self, module_name: str) -> bool:
        """True if the module is quantized: matched by some target and by no ignore pattern."""
        return any(re.search(p, module_name) for p in self.targets) and not any(
            re.search(p, module_name) for p in self.ignore
        )


class ActQuant(BaseModel):
    model_config = _CONFIG
    bits: Literal[4, 8, 16] = 4  # 16 = not quantized
    granularity: Literal["token"] = "token"  # dynamic per-token symmetric (the only one implemented)
    rotation: Literal["none", "hadamard"] = "none"


class KVQuant(BaseModel):
    model_config = _CONFIG
    bits: Literal[4, 8, 16] = 4  # 16 = not quantized
    group_size: int | None = None  # None = head_dim
    asymmetric: bool = True

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise _fail(f"group_size {v} must be positive (or null for head_dim)")
        return v

    @model_validator(mode="after")
    def _asym(self) -> KVQuant:
        if self.bits < 16 and not self.asymmetric:
            raise _fail(
                f"asymmetric must be true for bits {self.bits} < 16 (the KV-cache quantizer is asymmetric only)",
                "asymmetric",
            )
        return self


class ResolvedQuant(BaseModel):
    """The effective quantization: what a preset names, or the merge of preset and overrides."""

    model_config = _CONFIG
    weights: WeightQuant
    activations: ActQuant
    kv_cache: KVQuant


# Presets: plain module-level constants in one registry. A recipe names one (`scheme: w4a4kv4`)
# and may override whole sections. `resolved_quant` returns copies, so these never change.
W4A4KV4 = ResolvedQuant(weights=WeightQuant(bits=4), activations=ActQuant(bits=4), kv_cache=KVQuant(bits=4))
W4A4KV8 = ResolvedQuant(weights=WeightQuant(bits=4), activations=ActQuant(bits=4), kv_cache=KVQuant(bits=8))
W4A16 = ResolvedQuant(weights=WeightQuant(bits=4), activations=ActQuant(bits=16), kv_cache=KVQuant(bits=16))
W8A8 = ResolvedQuant(
    weights=WeightQuant(bits=8, granularity="channel"), activations=ActQuant(bits=8), kv_cache=KVQuant(bits=16)
)
FP = ResolvedQuant(weights=WeightQuant(bits=16), activations=ActQuant(bits=16), kv_cache=KVQuant(bits=16))
# per-output-channel 4-bit weights (one integer GEMM per linear with export.matmul: integer) made
# accurate by the Hadamard rotation of the residual stream and of down_proj's input (docs/numerics.md)
W4A4KV4_ROT = ResolvedQuant(weights=WeightQuant(bits=4, granularity="channel"),
                            activations=ActQuant(bits=4, rotation="hadamard"), kv_cache=KVQuant(bits=4))

SCHEMES: dict[str, ResolvedQuant] = {
    "w4a4kv4": W4A4KV4,
    "w4a4kv4-rot": W4A4KV4_ROT,
    "w4a4kv8": W4A4KV8,
    "w4a16": W4A16,
    "w8a8": W8A8,
    "fp": FP,
}


class Quant(BaseModel):
    """`scheme` names a preset; any section spelled out replaces the preset's section whole.
    Without a scheme, all three sections must be given."""

    model_config = _CONFIG
    scheme: str | None = None
    weights: WeightQuant | None = None
    activations: ActQuant | None = None
    kv_cache: KVQuant | None = None

    @model_validator(mode="after")
    def _complete(self) -> Quant:
        if self.scheme is not None:
            if self.scheme not in SCHEMES:
                raise _fail(f"unknown scheme {self.scheme!r} (known: {', '.join(SCHEMES)})", "scheme")
            return self
        missing = [k for k in ("weights", "activations", "kv_cache") if getattr(self, k) is None]
        if missing:
            raise _fail(
                "no scheme given, so weights, activations and kv_cache must all be spelled out "
                f"(missing: {', '.join(missing)})"
            )
        return self

    def resolved(self) -> ResolvedQuant:
        base = SCHEMES[self.scheme] if self.scheme is not None else None
        sections = {}
        for k in ("weights", "activations", "kv_cache"):
            own = getattr(self, k)
            sections[k] = (own if own is not None else getattr(base, k)).model_copy(deep=True)
        return ResolvedQuant(**sections)


# ---------------------------------------------------------------- pruning


SIGNALS = ("magnitude", "attention", "risk", "diversity")  # the pruning score's signals, in this order


class ScoreWeights(BaseModel):
    """Per-stage score weights: s = w_m m/sigma_m + w_a a/sigma_a - w_r r/sigma_r + w_d d/sigma_d
    (each >= 0; docs/design.md §4: magnitude, attention, low-bit risk, diversity)."""

    model_config = _CONFIG
    magnitude: float = Field(0.0, ge=0)
    attention: float = Field(1.0, ge=0)
    risk: float = Field(0.0, ge=0)
    diversity: float = Field(0.0, ge=0)


class ScoreSigma(BaseModel):
    """Normalisation constants calibration measured (each > 0)."""

    model_config = _CONFIG
    magnitude: float = Field(1.0, gt=0)
    attention: float = Field(1.0, gt=0)
    risk: float = Field(1.0, gt=0)
    diversity: float = Field(1.0, gt=0)


class Stage(BaseModel):
    """From decoder layer `layer` on (until the next stage), `keep` visual tokens remain.

    `keep` counts tokens at the recipe's `n_visual`; `fraction` (= keep / n_visual, written by
    calibrate) sets the count for other image sizes (`Pruning.keeps_for`)."""

    model_config = _CONFIG
    layer: int = Field(ge=0)
    keep: int = Field(ge=1)
    fraction: float | None = Field(None, gt=0, le=1)
    weights: ScoreWeights = ScoreWeights()
    sigma: ScoreSigma = ScoreSigma()
    # "topk": keep the `keep` highest scores; "maxmin": greedy max-min diversity selection on the
    # cosine similarity of the attention input's integer codes (DivPrune's rule; no score, so the
    # weights must all be 0). maxmin only at layer 0: there the graphs see the decoder input bit for
    # bit as the reference does; deeper, float noise in the hidden states can flip an activation
    # code, and the greedy set (which has no score grid to absorb it) with it.
    select: Literal["topk", "maxmin"] = "topk"

    @model_validator(mode="after")
    def _select(self) -> Stage:
        if self.select == "maxmin" and self.layer != 0:
            raise _fail(f"select maxmin is only supported at layer 0 (the decoder input), not layer {self.layer}",
                        "select")
        if self.select == "maxmin" and any(getattr(self.weights, x) for x in SIGNALS):
            raise _fail("select maxmin uses no score: its weights must all be 0", "weights")
        return self


class Pruning(BaseModel):
    model_config = _CONFIG
    budget: float = Field(gt=0, le=1)  # mean over all decoder layers of kept / n_visual
    n_visual: int = Field(gt=0)  # visual tokens per image the schedule was made for
    stages: list[Stage]  # empty = no pruning
    tie: Literal["lower_index"] = "lower_index"
    method: str = "quota"
    # "proportional": a dropped token is merged into its most similar kept token, whose attention
    # logits then get + log(tokens it stands for) (docs/design.md §4); "none": dropped tokens vanish
    merge: Literal["none", "proportional"] = "none"

    @model_validator(mode="after")
    def _schedule(self) -> Pruning:
        for i, s in enumerate(self.stages):
            if s.keep > self.n_visual:
                raise _fail(f"keep {s.keep} > n_visual {self.n_visual}", "stages", i, "keep")
            if s.fraction is not None and abs(s.fraction * self.n_visual - s.keep) > 0.5:
                raise _fail(
                    f"fraction {s.fraction} of n_visual {self.n_visual} is {s.fraction * self.n_visual:.6g} "
                    f"tokens, not keep {s.keep}",
                    "stages", i, "fraction",
                )
            if i == 0:
                continue
            prev = self.stages[i - 1]
            if s.layer <= prev.layer:
                raise _fail(
                    f"layer {s.layer} <= previous stage layer {prev.layer} (must be strictly ascending)",
                    "stages", i, "layer",
                )
            if s.keep > prev.keep:
                raise _fail(
                    f"keep {s.keep} > previous stage keep {prev.keep} (must be non-increasing)",
                    "stages", i, "keep",
                )
            if self.fraction_of(i) > self.fraction_of(i - 1):
                raise _fail(
                    f"fraction {self.fraction_of(i)} > previous stage's {self.fraction_of(i - 1)} (must be non-increasing)",
                    "stages", i, "fraction",
                )
        # The budget needs the layer count (check_against); what holds for any layer count:
        if not self.stages and self.budget < 1.0:
            raise _fail(f"no stages means no pruning (mean kept fraction 1), above budget {self.budget}", "budget")
        if self.stages and self.stages[-1].keep / self.n_visual > self.budget + 1e-9:
            raise _fail(
                f"last stage keeps {self.stages[-1].keep}/{self.n_visual} visual tokens, "
                f"so the mean kept fraction exceeds budget {self.budget} for any layer count",
                "budget",
            )
        return self

    def fraction_of(self, i: int) -> float:
        s = self.stages[i]
        return s.fraction if s.fraction is not None else s.keep / self.n_visual

    def keeps_for(self, n: int) -> list[int]:
        """Each stage's kept count for an image with n visual tokens: `keep` itself at n_visual,
        else round(fraction * n) (half up), at least 1, never more than the previous stage."""
        out: list[int] = []
        for i, s in enumerate(self.stages):
            k = s.keep if n == self.n_visual else min(n, max(1, math.floor(self.fraction_of(i) * n + 0.5)))
            out.append(min(k, out[-1]) if out else k)
        return out

    def kept_per_layer(self, num_layers: int) -> list[int]:
        from quota_export.prune.schedule import kept_per_layer

        return kept_per_layer([s.layer for s in self.stages], [s.keep for s in self.stages], self.n_visual, num_layers)


# ---------------------------------------------------------------- calibration, export


class Calibration(BaseModel):
    """What produced the recipe (provenance; read by no lowering)."""

    model_config = _CONFIG
    data: str
    samples: int = Field(ge=1)
    seed: int
    method: str
    divergence: float | None  # divergence reached (KL), null if not measured
    versions: dict[str, str]
    notes: str = ""


class Export(BaseModel):
    model_config = _CONFIG
    opset: int = Field(21, ge=21)
    targets: list[Literal["onnx", "tensorrt"]] = Field(default_factory=lambda: ["onnx"])
    max_seq: int = Field(256, gt=0)
    max_new_tokens: int = Field(8, gt=0)
    # Image sizes [H, W] to build graphs for (one set each, k per stage from the fractions);
    # null = the one size the model's processor declares. Dynamic-resolution families only
    # (Qwen2-VL / 2.5-VL; LLaVA-NeXT for sizes in its image_grid_pinpoints).
    image_sizes: list[list[int]] | None = None
    # Precision of the order-sensitive float work between quantizers (RMSNorm statistics, RoPE
    # tables, attention, SiLU, pruning signals): fp64 makes graphs and reference agree token for
    # token (reference.Deployed); fp32 is faster. The tensorrt target always uses fp32.
    reductions: Literal["fp64", "fp32"] = "fp64"
    # Quantized linears of the onnx target: float (QuantizeLinear -> Cast -> MatMul over the 4-bit
    # weights) or integer (MatMulInteger over uint8 activation codes and int8 weight codes, the same
    # bits; needs quant.weights.accumulation: exact). The tensorrt target always lowers float.
    matmul: Literal["float", "integer"] = "float"

    @field_validator("image_sizes")
    @classmethod
    def _sizes(cls, v):
        if v is None:
            return v
        if not v:
            raise _fail("give at least one [H, W] (or null for the model's declared size)")
        for i, hw in enumerate(v):
            if len(hw) != 2 or min(hw) <= 0:
                raise _fail(f"image size {hw} must be [H, W], both positive", i)
        if len({tuple(x) for x in v}) != len(v):
            raise _fail(f"duplicate image sizes {[list(x) for x in v]}")
        return v

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        if not v:
            raise _fail("at least one export target is needed")
        if len(set(v)) != len(v):
            raise _fail(f"duplicate export targets {v}")
        return v


# ---------------------------------------------------------------- recipe

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class Recipe(BaseModel):
    model_config = _CONFIG
    name: str  # recipe name, used as graphs/<name>/
    model: str  # HF checkpoint folder; a relative path resolves against the current working directory
    quant: Quant
    pruning: Pruning
    calibration: Calibration | None = None
    export: Export = Export()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise _fail(f"name {v!r} must be a folder name: letters, digits, '.', '_', '-' (not first)")
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if not v.strip():
            raise _fail("model must name a checkpoint folder")
        return v

    # -- derived views

    def weights_path(self) -> Path | None:
        """quant.weights.calibrated, resolved against the folder of the recipe's file (the current
        directory for a recipe not read from a file); None without calibrated weights."""
        name = self.resolved_quant().weights.calibrated
        if name is None:
            return None
        src = _SOURCES.get(id(self))
        return (src.parent if src is not None else Path(".")).resolve() / name

    def model_path(self) -> Path:
        """The checkpoint folder; relative paths are taken against the current working directory."""
        return Path(self.model).expanduser().resolve()

    def resolved_quant(self) -> ResolvedQuant:
        """Effective weights / activations / kv_cache (preset merged with overrides); a copy."""
        return self.quant.resolved()

    def kept_per_layer(self, num_layers: int) -> list[int]:
        """Visual tokens held by each decoder layer: n_visual before the first stage; a stage at
        layer l holds for l and all later layers until the next stage."""
        return self.pruning.kept_per_layer(num_layers)

    def mean_keep_fraction(self, num_layers: int) -> float:
        if num_layers <= 0:
            raise ValueError(f"num_layers must be positive, got {num_layers}")
        return sum(self.kept_per_layer(num_layers)) / (num_layers * self.pruning.n_visual)

    # -- checks against the model

    def check_against(self, num_layers: int, n_visual: int | None, module_names: list[str]) -> None:
        """Checks that need the model; raises UserError (one line) on the first problem.

        `n_visual` None: the model has no single declared size (export.image_sizes set); the
        schedule is then taken as fractions and the count is checked per size at build time."""
        p = self.pruning
        for i, s in enumerate(p.stages):
            if s.layer >= num_layers:
                raise UserError(
                    f"pruning.stages.{i}.layer: layer {s.layer} >= number of decoder layers {num_layers}"
                )
        if n_visual is not None and p.n_visual != n_visual:
            raise UserError(
                f"pruning.n_visual: recipe was made for {p.n_visual} visual tokens per image, "
                f"the model produces {n_visual}"
            )
        mean = self.mean_keep_fraction(num_layers)
        if mean > p.budget + 1e-9:
            raise UserError(
                f"pruning.budget: mean kept fraction {mean:.6g} over {num_layers} decoder layers "
                f"exceeds budget {p.budget}"
            )
        w = self.resolved_quant().weights
        from quota_export.limits import match_within_budget

        # matched in a child process with a time budget: a pattern that backtracks catastrophically
        # is one error line here instead of a hang wherever the names are matched later
        pats = [(f"quant.weights.{field}.{i}", pat) for field in ("targets", "ignore")
                for i, pat in enumerate(getattr(w, field))]
        for (where, pat), hits in zip(pats, match_within_budget(pats, list(module_names))):
            if not hits:
                raise UserError(f"{where}: pattern {pat!r} matches no module of the model")

    # -- serialisation

    def to_yaml(self) -> str:
        """Deterministic YAML: keys in model order, nulls written out, floats as repr (round-trip exact)."""
        return yaml.dump(
            self.model_dump(mode="python"),
            Dumper=yaml.SafeDumper,
            sort_keys=False,
            default_flow_style=False,
            allow_unicode=True,
            width=1000,
        )

    def content_hash(self) -> str:
        """sha256 (hex) of the canonical JSON of the recipe without `name`.

        Everything else is included (model string, pruning, calibration provenance, export),
        with `quant` in resolved form and without `scheme`: a preset name and the same
        arguments spelled out hash alike. Defaults count as written out, so adding a field
        to the schema changes every hash.
        """
        data = self.model_dump(mode="python", exclude={"name", "quant"})
        data["quant"] = self.resolved_quant().model_dump(mode="python")
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- load / save


def format_validation_error(e: ValidationError) -> str:
    """One line: `field.path: message` for each error, joined by '; '."""
    parts = []
    for err in e.errors():
        loc = list(err["loc"])
        msg = err["msg"]
        if err["type"] == "quota_recipe":
            loc += list((err.get("ctx") or {}).get("subloc", ()))
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        path = ".".join(str(x) for x in loc)
        parts.append(f"{path}: {msg}" if path else msg)
    return "; ".join(p.replace("\n", " ") for p in parts)


class _StrictLoader(yaml.SafeLoader):
    """safe_load that rejects duplicate keys instead of keeping the last one."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            m = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {m.line + 1}, column {m.column + 1})", None
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_error_line(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"invalid YAML{where}: {problem}".replace("\n", " ")


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a recipe; any problem is a one-line UserError naming the file and field."""
    from quota_export.limits import MAX_RECIPE_BYTES

    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
        if len(raw) > MAX_RECIPE_BYTES:
            raise UserError(f"{path}: recipe file larger than the limit of {MAX_RECIPE_BYTES} bytes")
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read recipe: {e}".replace("\n", " ")) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        raise UserError(f"{path}: {_yaml_error_line(e)}") from None
    except RecursionError:
        raise UserError(f"{path}: invalid YAML: nested too deeply") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a YAML mapping, got {type(data).__name__}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise UserError(f"{path}: {format_validation_error(e)}") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply") from None
    _SOURCES[id(recipe)] = Path(path)  # where it was read from: not part of its value (==, hash)
    weakref.finalize(recipe, _SOURCES.pop, id(recipe), None)
    return recipe


_SOURCES: dict[int, Path] = {}  # id(recipe) -> the file load_recipe read it from


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> None:
    """Write `recipe.to_yaml()` atomically (temp file in the same folder, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(recipe.to_yaml())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


__all__ = [
    "SCHEMES", "FP", "W4A16", "W4A4KV4", "W4A4KV4_ROT", "W4A4KV8", "W8A8", "DEFAULT_IGNORE", "DEFAULT_TARGETS",
    "ActQuant", "Calibration", "Export", "GPTQArgs", "KVQuant", "Pruning", "Quant", "Recipe",
    "ResolvedQuant", "ScoreSigma", "ScoreWeights", "Stage", "WeightQuant",
    "format_validation_error", "load_recipe", "save_recipe",
]
