"""Training configuration: a strictly validated YAML file plus ``--set`` overrides.

Unknown keys are errors that name the key and the allowed ones; ``${VAR}`` and
``${VAR:-default}`` are replaced from the environment; ``--set a.b=value`` overrides a
value (parsed as YAML, type-checked like the file).
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key."""


@dataclass
class ModelsConfig:
    base: str  # a diffusers FLUX.1 folder (transformer/, vae/, text_encoder*/, tokenizer*/)
    transformer: str | None = None  # optional BFL single file (e.g. flux1-dev.safetensors) replacing base/transformer
    adapter: str | None = None  # withanyone.safetensors to start from; None = fresh adapter
    antelopev2: str = ""  # insightface models root holding models/antelopev2/
    siglip: str = ""  # SigLIP folder or single safetensors


@dataclass
class DataConfig:
    manifest: str
    negatives: str | None = None  # negatives.safetensors from prepare.py; None = built from the manifest
    batch_size: int = 1
    buckets: list[list[int]] = field(default_factory=lambda: [[512, 512]])
    text_cache: str | None = None  # folder for cached text-encoder outputs


@dataclass
class LoraConfig:
    rank: int = 16
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: [
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
    ])


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    max_grad_norm: float = 1.0


@dataclass
class TrainConfig:
    mode: str = "adapter"  # adapter | lora | full
    lora: LoraConfig = field(default_factory=LoraConfig)
    optimizer: OptimConfig = field(default_factory=OptimConfig)
    mixed_precision: str = "no"  # no | bf16
    gradient_checkpointing: bool = False
    guidance: float = 1.0  # FLUX.1-dev distilled guidance fed to the model during training
    id_weight: float = 1.0
    siglip_weight: float = 1.0


@dataclass
class CheckpointConfig:
    every: int = 500
    keep: int = 3


@dataclass
class SampleConfig:
    every: int = 0  # 0 = never
    steps: int = 20
    prompt: str = "two people smiling at a party"
    seed: int = 0
    width: int = 512
    height: int = 512


@dataclass
class LossWeights:
    flow: float = 1.0
    id: float = 0.0
    contrastive: float = 0.0


@dataclass
class PhaseConfig:
    name: str
    steps: int
    prompt_mode: str = "caption"  # caption | fixed
    fixed_prompt: str = "{n} people"
    text_dropout: float = 0.0
    paired_ratio: float = 0.0
    min_quality: float | None = None
    lr: float | None = None  # None keeps optimizer.lr
    loss: LossWeights = field(default_factory=LossWeights)
    id_gate: float = 0.5  # ID losses only for samples with t <= id_gate (t=1 is pure noise)
    gt_aligned: bool = True  # align generated faces with the ground-truth landmarks
    negatives: int = 32  # extended negatives per batch for the contrastive loss
    temperature: float = 0.07
    reset_optimizer: bool = False


@dataclass
class Config:
    output_dir: str
    models: ModelsConfig
    data: DataConfig
    phases: list[PhaseConfig]
    seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    log_every: int = 1
    tensorboard: bool = True

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases)


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def substitute_env(text: str) -> str:
    def repl(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(f"environment variable ${{{name}}} is not set (use ${{{name}:-default}} for a default)")

    return _ENV.sub(repl, text)


def _convert(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} is not a valid {annotation}")
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(annotation)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation is bool and isinstance(value, bool):
        return value
    if annotation is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{where}: expected {getattr(annotation, '__name__', annotation)}, got {value!r}")


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with keys {sorted(f.name for f in dataclasses.fields(cls))}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = _convert(raw[name], hints[name], f"{where}.{name}" if where else name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where + '.' if where else ''}{name} is required")
    return cls(**kwargs)


def _apply_override(raw: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: use key.path=value")
    path, value = assignment.split("=", 1)
    keys = path.strip().split(".")
    node = raw
    for key in keys[:-1]:
        if isinstance(node, list):
            node = node[int(key)]
        else:
            node = node.setdefault(key, {})
    parsed = yaml.safe_load(value) if value != "" else ""
    if isinstance(node, list):
        node[int(keys[-1])] = parsed
    else:
        node[keys[-1]] = parsed


def validate(config: Config) -> Config:
    if config.train.mode not in ("adapter", "lora", "full"):
        raise ConfigError(f"train.mode must be adapter, lora or full, got {config.train.mode!r}")
    if config.train.mixed_precision not in ("no", "bf16"):
        raise ConfigError(f"train.mixed_precision must be 'no' or 'bf16', got {config.train.mixed_precision!r}")
    if not config.phases:
        raise ConfigError("phases: give at least one phase")
    for i, phase in enumerate(config.phases):
        where = f"phases[{i}] ({phase.name})"
        if phase.steps <= 0:
            raise ConfigError(f"{where}.steps must be positive")
        if phase.prompt_mode not in ("caption", "fixed"):
            raise ConfigError(f"{where}.prompt_mode must be 'caption' or 'fixed'")
        for name in ("text_dropout", "paired_ratio", "id_gate"):
            if not 0.0 <= getattr(phase, name) <= 1.0:
                raise ConfigError(f"{where}.{name} must be in [0, 1]")
    if config.checkpoint.every <= 0 or config.checkpoint.keep <= 0:
        raise ConfigError("checkpoint.every and checkpoint.keep must be positive")
    for w, h in config.data.buckets:
        if w % 16 or h % 16:
            raise ConfigError(f"data.buckets: {w}x{h} is not a multiple of 16")
    return config


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = yaml.safe_load(substitute_env(path.read_text(encoding="utf-8"))) or {}
    for assignment in overrides or []:
        _apply_override(raw, assignment)
    config = _build(Config, raw, "")
    # relative paths in the file are relative to the file
    base = path.resolve().parent

    def resolve(p: str | None) -> str | None:
        return p if not p else str((base / os.path.expanduser(p)).resolve())

    for obj, names in ((config.models, ("base", "transformer", "adapter", "antelopev2", "siglip")),
                       (config.data, ("manifest", "negatives", "text_cache")), (config, ("output_dir",))):
        for name in names:
            setattr(obj, name, resolve(getattr(obj, name)))
    return validate(config)
