"""Training configuration: a strictly validated YAML file plus ``--set`` overrides.

Unknown keys are errors that name the key and the allowed ones. Every numeric key declares its
range (``Annotated[float, Range(...)]``) and is checked against it, and for being finite, while the
file is read. Scalars follow YAML 1.2: ``1e-4`` is a number, ``no`` a word, ``2024-01-01`` text.
``${VAR}`` and ``${VAR:-default}`` are replaced from the environment inside values (never inside
comments or keys); an unquoted value is then read as if written there (``${LR:-1e-4}`` is a number).
``--set a.b=value`` overrides a value (read the same way, checked like the file). Every problem is a
:class:`ConfigError` of one line naming the file and line or the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import reprlib
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key."""


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 80, 80, 2, 6, 6


def _show(value: Any) -> str:
    """A value for an error message: one short line, however large or nested (aliases can nest deep)."""
    text = _REPR.repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric key (always finite), declared with the key:
    ``lr: Annotated[float, Range(gt=0)] = 1e-4``; ``what`` names the quantity and ``why`` explains
    the bound in the error. A test requires one on every int and float key."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    multiple_of: int | None = None
    what: str = ""
    why: str = ""

    def describe(self) -> str:
        low = f"[{_fmt(self.ge)}" if self.ge is not None else f"({_fmt(self.gt)}" if self.gt is not None else None
        high = f"{_fmt(self.le)}]" if self.le is not None else f"{_fmt(self.lt)})" if self.lt is not None else None
        if low and high:
            text = f"in {low}, {high}"
        elif low:
            text = f">= {_fmt(self.ge)}" if self.ge is not None else f"> {_fmt(self.gt)}"
        elif high:
            text = f"<= {_fmt(self.le)}" if self.le is not None else f"< {_fmt(self.lt)}"
        else:
            text = "finite"
        if self.multiple_of:
            text += f" and a multiple of {self.multiple_of}"
        return (f"{self.what} {text}" if self.what else text) + (f" ({self.why})" if self.why else "")

    def check(self, value: float, where: str) -> None:
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number ({self.describe()}); got {value}")
        if (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
            or (self.lt is not None and value >= self.lt)
            or (self.multiple_of and value % self.multiple_of)
        ):
            raise ConfigError(f"{where} must be {self.describe()}; got {_fmt(value)}")


FINITE = Range()
POSITIVE = Range(gt=0)
NON_NEGATIVE = Range(ge=0)
AT_LEAST_1 = Range(ge=1)
FRACTION = Range(ge=0, le=1)
COSINE = Range(ge=-1, le=1, what="a cosine similarity")
SEED = Range(ge=0, lt=2**32)
PIXELS = Range(ge=16, multiple_of=16, why="pixels; FLUX latents come in 16-pixel patches")


@dataclass
class ModelsConfig:
    # where the model files come from: a ComfyUI folder (every file from its model folders and
    # extra_model_paths.yaml, train/comfyui_files.py) or a diffusers FLUX.1 folder (transformer/,
    # vae/, text_encoder*/, tokenizer*/); exactly one of the two
    comfyui: str | None = None
    base: str | None = None
    # a BFL single file (e.g. flux1-dev.safetensors or its fp8 file); with comfyui a name in
    # diffusion_models/ (or unet/) or a path, chosen when there are several; with base it replaces base/transformer
    transformer: str | None = None
    vae: str | None = None  # comfyui only: the autoencoder (ae.safetensors) in vae/, by name or path
    clip_l: str | None = None  # comfyui only: CLIP-L in text_encoders/ (or clip/), by name or path
    t5: str | None = None  # comfyui only: T5-XXL in text_encoders/ (or clip/), by name or path
    adapter: str | None = None  # withanyone.safetensors to start from (comfyui: a name in withanyone/); None = fresh
    antelopev2: str = ""  # insightface models root holding models/antelopev2/ (comfyui: found in insightface/)
    siglip: str = ""  # SigLIP folder or single safetensors (comfyui: found in siglip/)


@dataclass
class MultiID2MConfig:
    """The authors' MultiID-2M tars (or tars prepare.py --format multiid2m wrote)."""

    shards: str  # glob(s) of .tar shards, comma-separated, e.g. /data/MultiID-2M/train_rec/re_*.tar
    # glob(s) of the released ref/tars/*.tar (read in place, index cached in <landmarks>/ref-index/) or the
    # folder they untar into (<refs>/<name>/*.{jpg,json,npy}); None = the photo itself
    refs: str | None = None
    cluster_centers: str | None = None  # ref/cluster_centers.tar, or the folder of <name>.npy it untars into
    landmarks: str | None = None  # cache of the GT faces' detected landmarks; None = <output_dir>/landmarks
    shuffle_buffer: Annotated[int, AT_LEAST_1] = 1000  # samples held per DataLoader worker for shuffling


@dataclass
class DataConfig:
    manifest: str | None = None  # JSONL manifest from prepare.py (source manifest or mix)
    source: Literal["manifest", "multiid2m", "mix"] = "manifest"
    multiid2m: MultiID2MConfig | None = None
    mix: list[Annotated[float, FINITE]] = field(
        default_factory=lambda: [1.0, 1.0]
    )  # source weights [manifest, multiid2m]
    negatives: str | None = None  # negatives.safetensors from prepare.py; None = built from the manifest
    batch_size: Annotated[int, AT_LEAST_1] = 1
    buckets: list[list[Annotated[int, PIXELS]]] = field(default_factory=lambda: [[512, 512]])
    text_cache: str | None = None  # folder for cached text-encoder outputs
    num_workers: Annotated[int, NON_NEGATIVE] = (
        4  # DataLoader worker processes per training process (0 = load in the trainer)
    )
    # share of samples read that may be skipped as bad before the run stops
    max_bad_fraction: Annotated[float, FRACTION] = 0.01
    max_image_pixels: Annotated[int, NON_NEGATIVE] = 150_000_000  # photos above are skipped (named); 0 = no limit


@dataclass
class LoraConfig:
    rank: Annotated[int, AT_LEAST_1] = 16
    alpha: Annotated[float, POSITIVE] = 16.0
    targets: list[str] = field(
        default_factory=lambda: [
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "add_q_proj",
            "add_k_proj",
            "add_v_proj",
            "to_add_out",
            "ff.net.0.proj",
            "ff.net.2",
            "ff_context.net.0.proj",
            "ff_context.net.2",
            "proj_mlp",
            "proj_out",
        ]
    )


# adamw: torch's (the authors'); adamw8bit: bitsandbytes' 8-bit states (2 instead of 8 bytes per parameter)
OptimizerName = Literal["adamw", "adamw8bit"]


@dataclass
class OptimConfig:
    # the authors' optimizer: AdamW, lr 1e-4, no weight decay, constant learning rate
    lr: Annotated[float, POSITIVE] = 1e-4
    weight_decay: Annotated[float, NON_NEGATIVE] = 0.0
    betas: list[Annotated[float, Range(ge=0, lt=1)]] = field(default_factory=lambda: [0.9, 0.999])
    eps: Annotated[float, POSITIVE] = 1e-8
    warmup_steps: Annotated[int, NON_NEGATIVE] = 0  # linear warm-up over the first global steps, then each phase's lr
    max_grad_norm: Annotated[float, NON_NEGATIVE] = 1.0  # 0 = no clipping
    name: OptimizerName = "adamw"


@dataclass
class AdapterLoraConfig:
    """LoRA on the trained adapter branch's linear layers (rank 0 = off: the whole branch trains)."""

    rank: Annotated[int, NON_NEGATIVE] = 0
    alpha: Annotated[float, POSITIVE] | None = None  # None = rank (scale 1)


@dataclass
class TrainConfig:
    mode: Literal["adapter", "lora", "full"] = "adapter"
    # which adapter branch trains: the authors train arcface and siglip separately and merge
    # them (train/merge.py); "both" trains them jointly
    branch: Literal["arcface", "siglip", "both"] = "arcface"
    lora: LoraConfig = field(default_factory=LoraConfig)
    optimizer: OptimConfig = field(default_factory=OptimConfig)
    mixed_precision: Literal["no", "bf16"] = "no"
    # dtype of the frozen FLUX, T5, CLIP and VAE; auto = bf16 with bf16 mixed precision, else fp32.
    # Trainable weights always keep fp32 master copies.
    frozen_dtype: Literal["auto", "bf16", "fp32"] = "auto"
    timesteps: Literal["shifted_uniform", "logit_normal"] = "shifted_uniform"  # shifted_uniform: the authors'
    # a fresh adapter: authors (small random) | zero (output projections 0: FLUX unchanged)
    adapter_init: Literal["authors", "zero"] = "authors"
    gradient_checkpointing: bool = False
    guidance: Annotated[float, NON_NEGATIVE] = 1.0  # FLUX.1-dev distilled guidance fed to the model during training
    id_weight: Annotated[float, NON_NEGATIVE] = 1.0
    siglip_weight: Annotated[float, NON_NEGATIVE] = 1.0
    # a step with a non-finite loss or gradient is skipped (never applied); this many in a row stop the run
    max_nonfinite_steps: Annotated[int, AT_LEAST_1] = 5
    # memory-lean options (README, training guide, "Memory"); the defaults are the authors' recipe
    # default: frozen_dtype; fp8_e4m3fn: the frozen FLUX's block weights in fp8
    frozen_storage: Literal["default", "fp8_e4m3fn"] = "default"
    adapter_lora: AdapterLoraConfig = field(default_factory=AdapterLoraConfig)
    release_text_encoders: bool = False  # cache every caption's embeddings at the start, then drop T5 and CLIP
    idle_branch_on_cpu: bool = False  # the adapter branch a one-branch run leaves off stays in CPU memory


@dataclass
class CheckpointConfig:
    every: Annotated[int, AT_LEAST_1] = 500
    keep: Annotated[int, AT_LEAST_1] = 3


@dataclass
class SampleConfig:
    every: Annotated[int, NON_NEGATIVE] = 0  # 0 = never
    steps: Annotated[int, AT_LEAST_1] = 20
    prompt: str = "two people smiling at a party"
    seed: Annotated[int, SEED] = 0
    width: Annotated[int, PIXELS] = 512
    height: Annotated[int, PIXELS] = 512


@dataclass
class LossWeights:
    flow: Annotated[float, NON_NEGATIVE] = 1.0
    id: Annotated[float, NON_NEGATIVE] = 0.0
    contrastive: Annotated[float, NON_NEGATIVE] = 0.0


@dataclass
class PhaseConfig:
    name: str
    steps: Annotated[int, AT_LEAST_1]
    prompt_mode: str = "caption"  # caption | fixed
    fixed_prompt: str = "{n} people"
    text_dropout: Annotated[float, FRACTION] = 0.0
    paired_ratio: Annotated[float, FRACTION] = 0.0
    min_quality: Annotated[float, FINITE] | None = None
    lr: Annotated[float, POSITIVE] | None = None  # None keeps optimizer.lr
    loss: LossWeights = field(default_factory=LossWeights)
    min_face_size: Annotated[float, NON_NEGATIVE] = (
        100.0  # records with a face smaller than this (photo pixels) are left out
    )
    crop: str = "keep_faces"  # keep_faces (random crop keeping every face) | center
    paired_candidates: Annotated[int, AT_LEAST_1] = (
        20  # paired reference: best of up to this many other photos of the person
    )
    paired_min_similarity: Annotated[float, COSINE] = 0.6  # ... whose ArcFace cosine to the GT face reaches this
    paired_accept_similarity: Annotated[float, COSINE] = 0.8  # ... stopping at the first above this
    paired_fallback: str = "skip"  # skip | self: when no candidate qualifies
    id_gate: Annotated[float, FRACTION] = 0.6  # ID losses only for samples with t <= id_gate (t=1 is pure noise)
    # True: generated faces aligned with the ground-truth landmarks; False (the authors'
    # pre-training mode): faces detected on the prediction, matched to the GT boxes by IoU
    gt_aligned: bool = True
    contrastive_positive: Literal["gt", "reference"] = "gt"  # gt: the authors'; reference: the paper's Eq. 7 text
    # gt: the batch's other GT faces (authors) | generated: other generated faces
    batch_negatives: Literal["gt", "generated"] = "gt"
    negatives: Annotated[int, NON_NEGATIVE] = 4033  # extended negatives per face from the pool (the authors' 4,033)
    temperature: Annotated[float, POSITIVE] = 0.1
    reset_optimizer: bool = False

    @property
    def uses_id_losses(self) -> bool:
        """The phase trains with the ID or the ID-contrastive loss (it needs the face models)."""
        return self.loss.id > 0 or self.loss.contrastive > 0


@dataclass
class Config:
    output_dir: str
    models: ModelsConfig
    data: DataConfig
    phases: list[PhaseConfig]
    seed: Annotated[int, SEED] = 0
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    log_every: Annotated[int, AT_LEAST_1] = 1
    tensorboard: bool = True
    setup_hint: str | None = None  # added to "path not found" errors (e.g. how to build the data)

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases)


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def substitute_env(text: str, where: str = "") -> str:
    """``${VAR}`` / ``${VAR:-default}`` in one value; ``where`` (e.g. "c.yaml line 3: ") leads the error."""

    def repl(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(
            f"{where}environment variable ${{{name}}} is not set (set it, or write ${{{name}:-default}} for a default)"
        )

    return _ENV.sub(repl, text)


# YAML 1.2 core-schema scalars (PyYAML reads YAML 1.1, where 1e-4 is a string, `no` is false and
# 2024-01-01 a date); underscores between digits are allowed, as in Python
_DIGITS = r"[0-9](?:_?[0-9])*"
_INT = re.compile(rf"^(?:[-+]?{_DIGITS}|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT = re.compile(
    rf"^(?:[-+]?(?:\.{_DIGITS}|{_DIGITS}(?:\.(?:{_DIGITS})?)?)(?:[eE][-+]?{_DIGITS})?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_WORD_BOOLS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
_INT_TAG, _FLOAT_TAG, _BOOL_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool"
_STR_TAG, _MERGE_TAG = "tag:yaml.org,2002:str", "tag:yaml.org,2002:merge"


def _parse_int(text: str) -> int:
    text = text.replace("_", "")
    sign = -1 if text.startswith("-") else 1
    body = text.lstrip("+-")
    if body[:2] in ("0o", "0x"):
        return sign * int(body[2:], 8 if body[1] == "o" else 16)
    return sign * int(body, 10)


def _parse_float(text: str) -> float:
    text = text.replace("_", "").lower()
    if text.endswith(".inf"):
        return -math.inf if text.startswith("-") else math.inf
    return math.nan if text == ".nan" else float(text)


class _Loader(yaml.SafeLoader):
    """Safe YAML with 1.2 core-schema numbers and booleans, no timestamps, and no key given twice."""

    yaml_implicit_resolvers = {
        first: [
            (tag, rx)
            for tag, rx in resolvers
            if tag not in (_INT_TAG, _FLOAT_TAG, _BOOL_TAG, "tag:yaml.org,2002:timestamp")
        ]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE_TAG:
                    if key_node.value in seen:
                        raise yaml.constructor.ConstructorError(
                            None,
                            None,
                            f"key {key_node.value!r} is given twice (first on line {seen[key_node.value] + 1})",
                            key_node.start_mark,
                        )
                    seen[key_node.value] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(_BOOL_TAG, _BOOL, list("tTfF"))
_Loader.add_implicit_resolver(_INT_TAG, _INT, list("-+0123456789"))
_Loader.add_implicit_resolver(_FLOAT_TAG, _FLOAT, list("-+0123456789."))


def _scalar_constructor(kind: str, pattern: re.Pattern, parse):
    def construct(loader: _Loader, node: yaml.Node):
        text = loader.construct_scalar(node)
        if not isinstance(text, str) or not pattern.match(text.strip()):  # e.g. an explicit `!!int 1e3`
            raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not {kind}", node.start_mark)
        return parse(text.strip())

    return construct


_Loader.add_constructor(_INT_TAG, _scalar_constructor("an integer", _INT, _parse_int))
_Loader.add_constructor(
    _FLOAT_TAG, _scalar_constructor("a number", re.compile(f"{_INT.pattern}|{_FLOAT.pattern}"), _parse_float)
)
_Loader.add_constructor(_BOOL_TAG, _scalar_constructor("true or false", _BOOL, lambda text: text.lower() == "true"))


def _substitute_nodes(
    node: yaml.Node, loader: _Loader, marks: re.Pattern, found: list[str], name: str, seen: set
) -> None:
    """Put the environment into every scalar holding a mark (comments never reach the nodes)."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.ScalarNode):
        if marks.search(node.value):
            where = f"{name} line {node.start_mark.line + 1}: "
            node.value = marks.sub(lambda m: substitute_env(found[int(m.group(1))], where), node.value)
            if node.style is None and node.tag == _STR_TAG:  # unquoted: read the result as if written there
                node.tag = loader.resolve(yaml.ScalarNode, node.value, (True, False))
    elif isinstance(node, (yaml.SequenceNode, yaml.MappingNode)):
        for item in node.value:
            for child in item if isinstance(item, tuple) else (item,):
                _substitute_nodes(child, loader, marks, found, name, seen)


def _yaml_error(exc: yaml.YAMLError, name: str, text: str) -> ConfigError:
    if isinstance(exc, yaml.reader.ReaderError):  # a control character, e.g. a binary file
        line = text.count("\n", 0, exc.position) + 1
        return ConfigError(
            f"{name} line {line}: character U+{exc.character:04X} at offset {exc.position} is not "
            f"allowed in YAML (a binary file?)"
        )
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = " ".join(str(p) for p in (getattr(exc, "context", None), getattr(exc, "problem", None)) if p) or str(exc)
    where = f"{name} line {mark.line + 1} column {mark.column + 1}" if mark else name
    return ConfigError(f"{where}: not valid YAML: {' '.join(problem.split())}")


def read_yaml(text: str, name: str, substitute: bool = True) -> Any:
    """One YAML document with this module's scalar rules; errors name ``name`` and the line."""
    found: list[str] = []
    tag = "withanyoneenv"
    while tag in text:
        tag += "x"
    if substitute:  # each ${...} becomes a plain word while parsing (so it works in {a: ${X}} too)
        text = _ENV.sub(lambda m: f"{tag}{len(found.append(m.group(0)) or found) - 1}{tag}", text)
    loader = None
    try:
        loader = _Loader(text)  # reads the whole text: a control character fails here
        node = loader.get_single_node()
        if node is None:
            return None
        if found:
            _substitute_nodes(node, loader, re.compile(f"{tag}([0-9]+){tag}"), found, name, set())
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, name, text) from None
    finally:
        if loader is not None:
            loader.dispose()


def _read_config_file(path: Path) -> dict:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{path} line {line}: not a text config (byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start} is not UTF-8): give the YAML file"
        ) from None
    raw = read_yaml(text, str(path))
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: the config must be a mapping of keys (output_dir:, models:, data:, phases: ...), "
            f"not a {type(raw).__name__}"
        )
    return raw


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        real = [o for o in typing.get_args(annotation) if o is not type(None)]
        if len(real) == 1:
            return real[0]
    return annotation


def _number(value: Any, kind: type, where: str) -> int | float:
    """``value`` as an int or float (a YAML number, or text spelling one, e.g. a quoted "1e-4")."""
    name = "a whole number" if kind is int else "a number"
    if isinstance(value, str):
        text = value.strip()
        if _INT.match(text):
            value = _parse_int(text)
        elif _FLOAT.match(text):
            value = _parse_float(text)
        else:
            try:
                value = float(text)  # nan, inf, 1E5, ... so that the range check names them
            except ValueError:
                raise ConfigError(f"{where}: expected {kind.__name__} ({name}), got {_show(value)}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected {kind.__name__} ({name}), got {_show(value)}")
    if kind is float:
        return float(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite whole number; got {value}")
        if not value.is_integer():
            raise ConfigError(f"{where}: expected int (a whole number), got {value:g}")
        return int(value)
    return value


def number_arg(kind: type, rule: Range):
    """An argparse ``type=`` for a command-line number: read like a config value, checked against ``rule``."""
    import argparse

    def parse(text: str) -> int | float:
        try:
            value = _number(text, kind, "value")
            rule.check(value, "value")
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix("value").lstrip(": ")) from None
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def _convert(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        base, *extras = typing.get_args(annotation)
        result = _convert(value, base, where)
        for extra in extras:
            if isinstance(extra, Range):
                extra.check(result, where)
        return result
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        real = [o for o in options if o is not type(None)]
        if len(real) == 1:  # X | None: X's own error (e.g. an unknown key of a section) is the clearest
            return _convert(value, real[0], where)
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {_show(value)} is not a valid {annotation}")
    if origin is Literal:  # a choice: the annotation is the one list of what is allowed
        allowed = typing.get_args(annotation)
        if isinstance(value, str) and value in allowed:
            return value
        raise ConfigError(f"{where} must be one of {', '.join(allowed)}; got {_show(value)}")
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {_show(value)}")
        (item,) = typing.get_args(annotation)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation in (int, float):
        number = _number(value, annotation, where)
        if annotation is float and not math.isfinite(number):
            raise ConfigError(f"{where} must be a finite number; got {number}")
        return number
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _WORD_BOOLS:
            return _WORD_BOOLS[value.strip().lower()]
        raise ConfigError(f"{where}: expected true or false, got {_show(value)}")
    if annotation is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{where}: expected {getattr(annotation, '__name__', annotation)}, got {_show(value)}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where or 'the config'}: expected a mapping with keys "
            f"{sorted(f.name for f in dataclasses.fields(cls))}, got {_show(raw)}"
        )
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields), key=str)
    if unknown:
        raise ConfigError(f"{where or 'the config'}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = _convert(raw[name], hints[name], f"{where}.{name}" if where else name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where + '.' if where else ''}{name} is required")
    return cls(**kwargs)


def _describe_list(items: list) -> str:
    if not items:
        return "an empty list"
    names = [
        f"{i} ({item['name']})" if isinstance(item, dict) and isinstance(item.get("name"), str) else str(i)
        for i, item in enumerate(items)
    ]
    return f"a list of {len(items)}: {', '.join(names)}"


def _apply_override(raw: dict, assignment: str) -> str:
    """Apply ``key.path=value`` to the raw config, walking the schema; returns the key path.

    A path that leads nowhere names the part that does not exist and what exists there.
    """
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: use key.path=value (e.g. --set phases.0.lr=1e-4)")
    path, value = assignment.split("=", 1)
    path = path.strip()
    keys = path.split(".")
    if not all(keys):
        raise ConfigError(f"--set {assignment!r}: {path!r} is not a key path (keys joined by dots, e.g. phases.0.lr)")
    parsed = read_yaml(value, f"--set {path}", substitute=False) if value.strip() else ""
    node: Any = raw
    annotation: Any = Config
    for i, key in enumerate(keys):
        here = ".".join(keys[:i]) or "the config"
        annotation = _strip_optional(annotation)
        if typing.get_origin(annotation) is Annotated:
            annotation = typing.get_args(annotation)[0]
        if dataclasses.is_dataclass(annotation):
            hints = _hints(annotation)
            if key not in hints:
                raise ConfigError(f"--set {path}: {here}: unknown key(s) {[key]}; allowed: {sorted(hints)}")
            if not isinstance(node, dict):
                raise ConfigError(f"--set {path}: {here} is {_show(node)} in the config, not a section")
            slot: Any = key
            child_annotation = hints[key]
        elif typing.get_origin(annotation) is list:
            if not isinstance(node, list):
                raise ConfigError(
                    f"--set {path}: {here} is not set as a list in the config: set it whole (--set {here}=[...])"
                )
            if not re.fullmatch(r"[0-9]+", key) or int(key) >= len(node):
                raise ConfigError(f"--set {path}: {key!r} is not an index of {here}, which is {_describe_list(node)}")
            slot, (child_annotation,) = int(key), typing.get_args(annotation)
        else:
            raise ConfigError(
                f"--set {path}: {here} is a single value, it has no {key!r} (set it with --set {here}=...)"
            )
        if i == len(keys) - 1:
            node[slot] = parsed
        else:
            child = node.get(slot) if isinstance(node, dict) else node[slot]
            if child is None and dataclasses.is_dataclass(_strip_optional(child_annotation)):
                node[slot] = child = {}
            elif child is None and typing.get_origin(_strip_optional(child_annotation)) is list:
                raise ConfigError(
                    f"--set {path}: {'.'.join(keys[: i + 1])} is not set in the config: "
                    f"set it whole (--set {'.'.join(keys[: i + 1])}=[...])"
                )
            node = child
            annotation = child_annotation
    return path


def numeric_keys_without_range(cls: type = None, prefix: str = "") -> list[str]:
    """Every int/float key (or list item) that declares no :class:`Range` (there should be none)."""
    cls = Config if cls is None else cls
    missing = []

    def walk(annotation: Any, where: str) -> None:
        annotation = _strip_optional(annotation)
        if typing.get_origin(annotation) is Annotated:
            base, *extras = typing.get_args(annotation)
            if _strip_optional(base) in (int, float) and not any(isinstance(e, Range) for e in extras):
                missing.append(where)
            return walk(base, where) if _strip_optional(base) not in (int, float) else None
        if annotation in (int, float):
            missing.append(where)
        elif dataclasses.is_dataclass(annotation):
            for name, hint in _hints(annotation).items():
                walk(hint, f"{where}.{name}" if where else name)
        elif typing.get_origin(annotation) in (list, typing.Union, types.UnionType):
            for arg in typing.get_args(annotation):
                if arg is not type(None):
                    walk(arg, f"{where}[]" if typing.get_origin(annotation) is list else where)

    walk(cls, prefix)
    return missing


MULTIID2M_PATH_KEYS = ("shards", "refs", "cluster_centers", "landmarks")
# models.* keys that, with models.comfyui, may name a file inside the install's model folders
COMFYUI_NAMED_KEYS = ("transformer", "vae", "clip_l", "t5", "adapter")
PATH_KEYS = (
    ("models", ("comfyui", "base", "transformer", "vae", "clip_l", "t5", "adapter", "antelopev2", "siglip")),
    ("data", ("manifest", "negatives", "text_cache")),
    ("", ("output_dir",)),
)


def _validate_models(models: ModelsConfig) -> None:
    if models.comfyui and models.base:
        raise ConfigError(
            "models.comfyui and models.base are both set: use one (models.comfyui takes every file "
            "from a ComfyUI install; models.base is a diffusers FLUX.1 folder); unset the other, "
            "e.g. --set models.base=null"
        )
    if not models.comfyui and not models.base:
        raise ConfigError("set models.comfyui to your ComfyUI folder (or models.base to a diffusers FLUX.1 folder)")
    if not models.comfyui:
        named = [k for k in ("vae", "clip_l", "t5") if getattr(models, k)]
        if named:
            raise ConfigError(
                f"models.{', models.'.join(named)} choose files of a ComfyUI install: set "
                "models.comfyui, or unset them (models.base holds its own vae/ and text encoders)"
            )


def validate(config: Config) -> Config:
    from .data import DataOptions

    _validate_models(config.models)

    if not config.output_dir.strip():
        raise ConfigError("output_dir is empty: give the folder for the checkpoints, samples and logs")
    if not config.phases:
        raise ConfigError("phases: give at least one phase")
    for i, bucket in enumerate(config.data.buckets):
        if len(bucket) != 2:
            raise ConfigError(f"data.buckets[{i}]: give [width, height]; got {bucket}")
    try:
        DataOptions(buckets=tuple(tuple(b) for b in config.data.buckets))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"data.buckets: {exc}") from exc
    for i, phase in enumerate(config.phases):
        where = f"phases[{i}] ({phase.name})"  # numbers: checked against their declared Range while read
        try:  # the data rules live in DataOptions: checked there, once
            DataOptions.from_phase(phase, config.data.buckets)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
    data = config.data
    if data.source in ("manifest", "mix") and not data.manifest:
        raise ConfigError(f"data.source={data.source} needs data.manifest (build it with `python train/prepare.py`)")
    if data.source in ("multiid2m", "mix") and data.multiid2m is None:
        raise ConfigError(f"data.source={data.source} needs a data.multiid2m section with shards: <glob of .tar>")
    if data.source == "manifest" and data.multiid2m is not None:
        raise ConfigError("data.multiid2m is set but data.source is manifest: set data.source to multiid2m or mix")
    if len(data.mix) != 2 or min(data.mix) < 0 or sum(data.mix) <= 0:
        raise ConfigError(
            f"data.mix must be two non-negative weights [manifest, multiid2m], not both 0; got {data.mix}"
        )
    _validate_lean(config)
    return config


def _validate_lean(config: Config) -> None:
    """The memory-lean keys: only the combinations the trainer can run."""
    t = config.train
    if t.frozen_storage != "default" and t.mode != "adapter":
        raise ConfigError(
            f"train.frozen_storage={t.frozen_storage} stores the frozen FLUX in fp8, but train.mode="
            f"{t.mode} trains FLUX weights: use train.mode=adapter or train.frozen_storage=default"
        )
    if t.adapter_lora.rank < 0 or (t.adapter_lora.alpha is not None and t.adapter_lora.alpha <= 0):
        raise ConfigError("train.adapter_lora.rank must be >= 0 (0 = off) and alpha positive (or unset = rank)")
    if (
        t.release_text_encoders
        and config.data.source != "manifest"
        and any(p.prompt_mode == "caption" for p in config.phases)
    ):
        raise ConfigError(
            "train.release_text_encoders needs every caption before training, but the MultiID-2M "
            "shards' captions are only read while streaming: use it with data.source=manifest, or "
            "with fixed-prompt phases only, or set train.release_text_encoders=false"
        )


def resolved_paths(config: Config) -> list[tuple[str, str]]:
    """(key, absolute path) of every path the config sets, in a fixed order."""
    out = []
    for section, names in PATH_KEYS:
        obj = getattr(config, section) if section else config
        for name in names:
            value = getattr(obj, name)
            if value:
                out.append((f"{section}.{name}" if section else name, value))
    if config.data.multiid2m is not None:
        out += [
            (f"data.multiid2m.{name}", getattr(config.data.multiid2m, name))
            for name in MULTIID2M_PATH_KEYS
            if getattr(config.data.multiid2m, name)
        ]
    return out


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Read, override, resolve and validate a config.

    Relative paths inside the file resolve against the file's folder; relative paths given
    with ``--set`` on the command line resolve against the current directory.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" if not path.exists() else f"config {path} is not a file")
    raw = _read_config_file(path)
    overridden = {_apply_override(raw, assignment) for assignment in overrides or []}
    config = _build(Config, raw, "")
    file_base, cwd = path.resolve().parent, Path.cwd()

    def from_command_line(key: str) -> bool:
        parts = key.split(".")
        return any(".".join(parts[:n]) in overridden for n in range(1, len(parts) + 1))

    for section, names in PATH_KEYS:
        obj = getattr(config, section) if section else config
        for name in names:
            value = getattr(obj, name)
            if value:
                base = cwd if from_command_line(f"{section}.{name}" if section else name) else file_base
                resolved = (base / os.path.expanduser(value)).resolve()
                if (
                    section == "models"
                    and name in COMFYUI_NAMED_KEYS
                    and config.models.comfyui
                    and not os.path.isabs(os.path.expanduser(value))
                    and not resolved.exists()
                ):
                    continue  # a file name (or sub/name) inside the install's model folders
                setattr(obj, name, str(resolved))
    if config.data.multiid2m is not None:
        section = config.data.multiid2m
        for name in MULTIID2M_PATH_KEYS:
            value = getattr(section, name)
            if value:
                base = cwd if from_command_line(f"data.multiid2m.{name}") else file_base
                parts = [str(base / os.path.expanduser(v.strip())) for v in value.split(",") if v.strip()]
                setattr(section, name, ",".join(os.path.normpath(v) for v in parts))
    return validate(config)


def _check_multiid2m_refs(section: MultiID2MConfig, hint: str) -> None:
    """``refs``: a folder of ``<name>/`` or glob(s) of plain reference tars; ``cluster_centers``: a folder or a tar."""
    from .data.multiid2m.references import CompressedTarError, expand_reference_tars, is_reference_folder

    if section.refs:
        if is_reference_folder(section.refs):
            folder = Path(section.refs)
            if not any(p.is_dir() for p in folder.iterdir()) and any(folder.glob("*.tar*")):
                raise ConfigError(
                    f"data.multiid2m.refs: {folder} holds tar files but no <name>/ folders: set it to "
                    f"the tars themselves, {folder / '*.tar'} (read in place), or untar them there{hint}"
                )
        else:
            try:
                expand_reference_tars(section.refs)
            except CompressedTarError as exc:
                raise ConfigError(f"data.multiid2m.refs: {exc}{hint}") from exc
            except FileNotFoundError as exc:
                raise ConfigError(f"data.multiid2m.refs: {section.refs} is not a folder, and {exc}{hint}") from exc
    centres = section.cluster_centers
    if centres:
        path = Path(centres)
        if not path.exists():
            raise ConfigError(
                f"data.multiid2m.cluster_centers: {centres} does not exist (ref/cluster_centers.tar, "
                f"or the folder of <name>.npy it untars into){hint}"
            )
        if path.is_file() and not path.name.lower().endswith((".tar", ".tar.gz", ".tgz")):
            raise ConfigError(
                f"data.multiid2m.cluster_centers: {centres} is a file but not a .tar: give "
                f"ref/cluster_centers.tar or the folder of <name>.npy it untars into{hint}"
            )


OUTPUT_FOLDERS = ("checkpoints", "samples", "logs", "landmarks")  # what a run writes inside output_dir
OUTPUT_FILES = ("losses.jsonl",)


def check_output_dir(output_dir: str) -> None:
    """``output_dir`` is (or can become) a folder this process can write, tried by writing a file there
    (and in the folders a run keeps inside it, where they exist).

    Nothing is created: a missing folder is tried in its nearest existing parent.
    """
    if not str(output_dir).strip():
        raise ConfigError("output_dir is empty: give the folder for the checkpoints, samples and logs")
    path = Path(output_dir)
    target = path
    while not target.exists() and target != target.parent:
        target = target.parent
    if not target.is_dir():
        inside = "" if target == path else f" (it would be inside {target}, which is a file)"
        raise ConfigError(
            f"output_dir: {path} is not a folder{inside}: give a folder for the checkpoints, "
            f"samples and logs (--set output_dir=...)"
        )
    folders = [target] + [path / name for name in OUTPUT_FOLDERS if (path / name).exists()]
    for folder in folders:
        if not folder.is_dir():
            raise ConfigError(
                f"output_dir: {folder} is a file where the run keeps a folder: move it away, or give "
                f"another output_dir (--set output_dir=...)"
            )
        try:
            with tempfile.TemporaryFile(dir=folder, prefix=".withanyone-write-test-"):
                pass
        except OSError as exc:
            what = f"{path} cannot be created in {target}" if target != path else f"{folder} is not writable"
            raise ConfigError(
                f"output_dir: {what} ({exc.strerror or exc}): give a folder you can write (--set output_dir=...)"
            ) from None
    for name in OUTPUT_FILES:
        if (path / name).exists():
            try:
                with open(path / name, "ab"):  # appended to by the run; opening changes nothing
                    pass
            except OSError as exc:
                raise ConfigError(
                    f"output_dir: {path / name} cannot be appended to ({exc.strerror or exc}): give a "
                    f"folder you can write (--set output_dir=...)"
                ) from None


FLUX_FOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def _uses_id_losses(config: Config) -> bool:
    return any(p.uses_id_losses for p in config.phases)


def check_paths(config: Config) -> None:
    """Fail fast, before any model loads, on a path that does not exist (never a hub request), or an
    ``output_dir`` that cannot be written.

    Each error names the key, the resolved path and what belongs there; the config's
    ``setup_hint`` (e.g. how to build the data) is added to it.
    """
    hint = f"\n{config.setup_hint}" if config.setup_hint else ""

    def fail(key: str, path: str, what: str) -> None:
        raise ConfigError(f"{key}: {path} does not exist ({what}){hint}")

    check_output_dir(config.output_dir)
    m, d = config.models, config.data
    uses_id_losses = _uses_id_losses(config)
    if m.comfyui:
        resolve_comfyui(config, hint)
    elif not Path(m.base).is_dir():
        fail("models.base", m.base, "a diffusers FLUX.1 folder with " + ", ".join(f"{f}/" for f in FLUX_FOLDERS))
    for folder in FLUX_FOLDERS if not m.comfyui else ():
        if folder == "transformer" and m.transformer:
            continue
        if not (Path(m.base) / folder).is_dir():
            fail("models.base", str(Path(m.base) / folder), f"every diffusers FLUX.1 folder has {folder}/")
    for key, value, what in (
        ("models.transformer", m.transformer, "a BFL FLUX.1 .safetensors file"),
        ("models.adapter", m.adapter, "a withanyone.safetensors to start from"),
        ("models.antelopev2", m.antelopev2, "the insightface models root holding models/antelopev2/"),
        ("models.siglip", m.siglip, "the SigLIP folder or .safetensors"),
        ("data.manifest", d.manifest, "build it with `python train/prepare.py`"),
        ("data.negatives", d.negatives, "prepare.py writes negatives.safetensors next to the manifest"),
    ):
        if value and not Path(value).exists():
            fail(key, value, what)
    if d.multiid2m is not None:
        from .data.multiid2m.format import expand_shards

        try:
            expand_shards(d.multiid2m.shards)
        except FileNotFoundError as exc:
            raise ConfigError(f"data.multiid2m.shards: {exc}{hint}") from exc
        _check_multiid2m_refs(d.multiid2m, hint)
    if uses_id_losses and not m.antelopev2:
        raise ConfigError(
            "models.antelopev2 is empty but a phase uses the ID losses: set it to the insightface "
            "models root holding models/antelopev2/"
        )
    if config.train.branch != "arcface" and not m.siglip:
        raise ConfigError(
            f"models.siglip is empty but train.branch={config.train.branch} trains the SigLIP branch: "
            "set it to the siglip-base-patch16-256-i18n folder"
        )


def resolve_comfyui(config: Config, hint: str = "") -> None:
    """With ``models.comfyui``: find every model file in the install (headers only) and set the
    ``models.*`` keys to their absolute paths; a missing or ambiguous file is a ConfigError."""
    from .comfyui_files import ComfyUIFilesError, resolve_comfyui_models

    m = config.models
    try:
        found = resolve_comfyui_models(
            m.comfyui,
            transformer=m.transformer,
            vae=m.vae,
            clip_l=m.clip_l,
            t5=m.t5,
            adapter=m.adapter,
            antelopev2=m.antelopev2 or None,
            siglip=m.siglip or None,
            need_antelopev2=_uses_id_losses(config),
            need_siglip=config.train.branch != "arcface",
        )
    except ComfyUIFilesError as exc:
        raise ConfigError(f"{exc}{hint}") from exc
    m.comfyui = str(found.root)  # the portable package's ComfyUI/ when its parent was given
    for key in ("transformer", "vae", "clip_l", "t5", "adapter"):
        value = getattr(found, key)
        setattr(m, key, str(value) if value else None)
    m.antelopev2 = str(found.antelopev2) if found.antelopev2 else ""
    m.siglip = str(found.siglip) if found.siglip else ""
