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
class MultiID2MConfig:
    """The authors' MultiID-2M tars (or tars prepare.py --format multiid2m wrote)."""

    shards: str  # glob(s) of .tar shards, comma-separated, e.g. /data/MultiID-2M/train_rec/re_*.tar
    # glob(s) of the released ref/tars/*.tar (read in place, index cached in <landmarks>/ref-index/) or the
    # folder they untar into (<refs>/<name>/*.{jpg,json,npy}); None = the photo itself
    refs: str | None = None
    cluster_centers: str | None = None  # ref/cluster_centers.tar, or the folder of <name>.npy it untars into
    landmarks: str | None = None  # cache of the GT faces' detected landmarks; None = <output_dir>/landmarks
    shuffle_buffer: int = 1000  # samples held per DataLoader worker for shuffling


@dataclass
class DataConfig:
    manifest: str | None = None  # JSONL manifest from prepare.py (source manifest or mix)
    source: str = "manifest"  # manifest | multiid2m | mix
    multiid2m: MultiID2MConfig | None = None
    mix: list[float] = field(default_factory=lambda: [1.0, 1.0])  # source weights [manifest, multiid2m]
    negatives: str | None = None  # negatives.safetensors from prepare.py; None = built from the manifest
    batch_size: int = 1
    buckets: list[list[int]] = field(default_factory=lambda: [[512, 512]])
    text_cache: str | None = None  # folder for cached text-encoder outputs
    num_workers: int = 4  # DataLoader worker processes per training process (0 = load in the trainer)


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
    # the authors' optimizer: AdamW, lr 1e-4, no weight decay, constant learning rate
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0  # linear warm-up over the first global steps, then each phase's lr
    max_grad_norm: float = 1.0
    # adamw (torch, the authors') | adamw8bit (bitsandbytes: 8-bit states, 2 instead of 8 bytes per parameter)
    name: str = "adamw"


@dataclass
class AdapterLoraConfig:
    """LoRA on the trained adapter branch's linear layers (rank 0 = off: the whole branch trains)."""

    rank: int = 0
    alpha: float | None = None  # None = rank (scale 1)


@dataclass
class TrainConfig:
    mode: str = "adapter"  # adapter | lora | full
    # which adapter branch trains: the authors train arcface and siglip separately and merge
    # them (train/merge.py); "both" trains them jointly
    branch: str = "arcface"  # arcface | siglip | both
    lora: LoraConfig = field(default_factory=LoraConfig)
    optimizer: OptimConfig = field(default_factory=OptimConfig)
    mixed_precision: str = "no"  # no | bf16
    # dtype of the frozen FLUX, T5, CLIP and VAE; auto = bf16 with bf16 mixed precision, else fp32.
    # Trainable weights always keep fp32 master copies.
    frozen_dtype: str = "auto"  # auto | bf16 | fp32
    timesteps: str = "shifted_uniform"  # shifted_uniform (authors) | logit_normal
    adapter_init: str = "authors"  # a fresh adapter: authors (small random) | zero (output projections 0: FLUX unchanged)
    gradient_checkpointing: bool = False
    guidance: float = 1.0  # FLUX.1-dev distilled guidance fed to the model during training
    id_weight: float = 1.0
    siglip_weight: float = 1.0
    # memory-lean options (README, training guide, "Memory"); the defaults are the authors' recipe
    frozen_storage: str = "default"  # default (frozen_dtype) | fp8_e4m3fn: the frozen FLUX's block weights in fp8
    adapter_lora: AdapterLoraConfig = field(default_factory=AdapterLoraConfig)
    release_text_encoders: bool = False  # cache every caption's embeddings at the start, then drop T5 and CLIP
    idle_branch_on_cpu: bool = False  # the adapter branch a one-branch run leaves off stays in CPU memory


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
    min_face_size: float = 100.0  # records with a face smaller than this (photo pixels) are left out
    crop: str = "keep_faces"  # keep_faces (random crop keeping every face) | center
    paired_candidates: int = 20  # paired reference: best of up to this many other photos of the person
    paired_min_similarity: float = 0.6  # ... whose ArcFace cosine to the GT face reaches this
    paired_accept_similarity: float = 0.8  # ... stopping at the first above this
    paired_fallback: str = "skip"  # skip | self: when no candidate qualifies
    id_gate: float = 0.6  # ID losses only for samples with t <= id_gate (t=1 is pure noise)
    # True: generated faces aligned with the ground-truth landmarks; False (the authors'
    # pre-training mode): faces detected on the prediction, matched to the GT boxes by IoU
    gt_aligned: bool = True
    contrastive_positive: str = "gt"  # gt (authors) | reference (the paper's Eq. 7 text)
    batch_negatives: str = "gt"  # gt: the batch's other GT faces (authors) | generated: other generated faces
    negatives: int = 4033  # extended negatives per face from the pool (the authors' 4,033)
    temperature: float = 0.1
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
    setup_hint: str | None = None  # added to "path not found" errors (e.g. how to build the data)

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


def _apply_override(raw: dict, assignment: str) -> str:
    """Apply ``key.path=value`` to the raw config; returns the key path."""
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
    return ".".join(keys)


_CHOICES = {
    "train.mode": ("adapter", "lora", "full"),
    "train.branch": ("arcface", "siglip", "both"),
    "train.mixed_precision": ("no", "bf16"),
    "train.frozen_dtype": ("auto", "bf16", "fp32"),
    "train.timesteps": ("shifted_uniform", "logit_normal"),
    "train.adapter_init": ("authors", "zero"),
}
_PHASE_CHOICES = {
    "contrastive_positive": ("gt", "reference"),
    "batch_negatives": ("gt", "generated"),
}
DATA_SOURCES = ("manifest", "multiid2m", "mix")
MULTIID2M_PATH_KEYS = ("shards", "refs", "cluster_centers", "landmarks")
PATH_KEYS = (("models", ("base", "transformer", "adapter", "antelopev2", "siglip")),
             ("data", ("manifest", "negatives", "text_cache")), ("", ("output_dir",)))


def validate(config: Config) -> Config:
    from .data import DataOptions

    for key, allowed in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")
    if not config.phases:
        raise ConfigError("phases: give at least one phase")
    try:
        DataOptions(buckets=tuple(tuple(b) for b in config.data.buckets))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"data.buckets: {exc}") from exc
    for i, phase in enumerate(config.phases):
        where = f"phases[{i}] ({phase.name})"
        if phase.steps <= 0:
            raise ConfigError(f"{where}.steps must be positive")
        if not 0.0 <= phase.id_gate <= 1.0:
            raise ConfigError(f"{where}.id_gate must be in [0, 1]")
        if phase.temperature <= 0 or phase.negatives < 0:
            raise ConfigError(f"{where}: temperature must be positive and negatives >= 0")
        for name, allowed in _PHASE_CHOICES.items():
            if getattr(phase, name) not in allowed:
                raise ConfigError(f"{where}.{name} must be one of {', '.join(allowed)}; got {getattr(phase, name)!r}")
        try:  # the data rules live in DataOptions: checked there, once
            DataOptions.from_phase(phase, config.data.buckets)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
    if config.checkpoint.every <= 0 or config.checkpoint.keep <= 0:
        raise ConfigError("checkpoint.every and checkpoint.keep must be positive")
    data = config.data
    if data.source not in DATA_SOURCES:
        raise ConfigError(f"data.source must be one of {', '.join(DATA_SOURCES)}; got {data.source!r}")
    if data.source in ("manifest", "mix") and not data.manifest:
        raise ConfigError(f"data.source={data.source} needs data.manifest (build it with `python train/prepare.py`)")
    if data.source in ("multiid2m", "mix") and data.multiid2m is None:
        raise ConfigError(f"data.source={data.source} needs a data.multiid2m section with shards: <glob of .tar>")
    if data.source == "manifest" and data.multiid2m is not None:
        raise ConfigError("data.multiid2m is set but data.source is manifest: set data.source to multiid2m or mix")
    if len(data.mix) != 2 or min(data.mix) < 0 or sum(data.mix) <= 0:
        raise ConfigError(f"data.mix must be two non-negative weights [manifest, multiid2m], not both 0; got {data.mix}")
    if data.multiid2m is not None and data.multiid2m.shuffle_buffer < 1:
        raise ConfigError("data.multiid2m.shuffle_buffer must be at least 1")
    if config.data.num_workers < 0 or config.data.batch_size <= 0:
        raise ConfigError("data.num_workers must be >= 0 and data.batch_size positive")
    _validate_lean(config)
    return config


LEAN_CHOICES = {"train.frozen_storage": ("default", "fp8_e4m3fn"), "train.optimizer.name": ("adamw", "adamw8bit")}


def _validate_lean(config: Config) -> None:
    """The memory-lean keys: known choices, and only the combinations the trainer can run."""
    t = config.train
    for key, value in (("train.frozen_storage", t.frozen_storage), ("train.optimizer.name", t.optimizer.name)):
        if value not in LEAN_CHOICES[key]:
            raise ConfigError(f"{key} must be one of {', '.join(LEAN_CHOICES[key])}; got {value!r}")
    if t.frozen_storage != "default" and t.mode != "adapter":
        raise ConfigError(f"train.frozen_storage={t.frozen_storage} stores the frozen FLUX in fp8, but train.mode="
                          f"{t.mode} trains FLUX weights: use train.mode=adapter or train.frozen_storage=default")
    if t.adapter_lora.rank < 0 or (t.adapter_lora.alpha is not None and t.adapter_lora.alpha <= 0):
        raise ConfigError("train.adapter_lora.rank must be >= 0 (0 = off) and alpha positive (or unset = rank)")
    if t.release_text_encoders and config.data.source != "manifest" and any(
            p.prompt_mode == "caption" for p in config.phases):
        raise ConfigError("train.release_text_encoders needs every caption before training, but the MultiID-2M "
                          "shards' captions are only read while streaming: use it with data.source=manifest, or "
                          "with fixed-prompt phases only, or set train.release_text_encoders=false")


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
        out += [(f"data.multiid2m.{name}", getattr(config.data.multiid2m, name)) for name in MULTIID2M_PATH_KEYS
                if getattr(config.data.multiid2m, name)]
    return out


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Read, override, resolve and validate a config.

    Relative paths inside the file resolve against the file's folder; relative paths given
    with ``--set`` on the command line resolve against the current directory.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = yaml.safe_load(substitute_env(path.read_text(encoding="utf-8"))) or {}
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
                setattr(obj, name, str((base / os.path.expanduser(value)).resolve()))
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
    from .data.multiid2m_refs import CompressedTarError, expand_reference_tars, is_reference_folder

    if section.refs:
        if is_reference_folder(section.refs):
            folder = Path(section.refs)
            if not any(p.is_dir() for p in folder.iterdir()) and any(folder.glob("*.tar*")):
                raise ConfigError(f"data.multiid2m.refs: {folder} holds tar files but no <name>/ folders: set it to "
                                  f"the tars themselves, {folder / '*.tar'} (read in place), or untar them there{hint}")
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
            raise ConfigError(f"data.multiid2m.cluster_centers: {centres} does not exist (ref/cluster_centers.tar, "
                              f"or the folder of <name>.npy it untars into){hint}")
        if path.is_file() and not path.name.lower().endswith((".tar", ".tar.gz", ".tgz")):
            raise ConfigError(f"data.multiid2m.cluster_centers: {centres} is a file but not a .tar: give "
                              f"ref/cluster_centers.tar or the folder of <name>.npy it untars into{hint}")


FLUX_FOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def check_paths(config: Config) -> None:
    """Fail fast, before any model loads, on a path that does not exist (never a hub request).

    Each error names the key, the resolved path and what belongs there; the config's
    ``setup_hint`` (e.g. how to build the data) is added to it.
    """
    hint = f"\n{config.setup_hint}" if config.setup_hint else ""

    def fail(key: str, path: str, what: str) -> None:
        raise ConfigError(f"{key}: {path} does not exist ({what}){hint}")

    m, d = config.models, config.data
    if not Path(m.base).is_dir():
        fail("models.base", m.base, "a diffusers FLUX.1 folder with " + ", ".join(f"{f}/" for f in FLUX_FOLDERS))
    for folder in FLUX_FOLDERS:
        if folder == "transformer" and m.transformer:
            continue
        if not (Path(m.base) / folder).is_dir():
            fail("models.base", str(Path(m.base) / folder), f"every diffusers FLUX.1 folder has {folder}/")
    for key, value, what in (("models.transformer", m.transformer, "a BFL FLUX.1 .safetensors file"),
                             ("models.adapter", m.adapter, "a withanyone.safetensors to start from"),
                             ("models.antelopev2", m.antelopev2, "the insightface models root holding models/antelopev2/"),
                             ("models.siglip", m.siglip, "the SigLIP folder or .safetensors"),
                             ("data.manifest", d.manifest, "build it with `python train/prepare.py`"),
                             ("data.negatives", d.negatives, "prepare.py writes negatives.safetensors next to the manifest")):
        if value and not Path(value).exists():
            fail(key, value, what)
    if d.multiid2m is not None:
        from .data.multiid2m import expand_shards

        try:
            expand_shards(d.multiid2m.shards)
        except FileNotFoundError as exc:
            raise ConfigError(f"data.multiid2m.shards: {exc}{hint}") from exc
        _check_multiid2m_refs(d.multiid2m, hint)
    uses_id_losses = any(p.loss.id > 0 or p.loss.contrastive > 0 for p in config.phases)
    if uses_id_losses and not m.antelopev2:
        raise ConfigError("models.antelopev2 is empty but a phase uses the ID losses: set it to the insightface "
                          "models root holding models/antelopev2/")
    if config.train.branch != "arcface" and not m.siglip:
        raise ConfigError(f"models.siglip is empty but train.branch={config.train.branch} trains the SigLIP branch: "
                          "set it to the siglip-base-patch16-256-i18n folder")
