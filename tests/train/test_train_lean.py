"""Memory-lean training modes (train/lean.py) on the tiny model set: fp8 storage of the frozen FLUX,
8-bit AdamW, the adapter trained through LoRA and merged on save, text encoders cached then released,
the idle branch in CPU memory; and the memory accounting's static part against the real tensors."""

from __future__ import annotations

import gc
import importlib.util
import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from support.needs import missing
from train.config import ConfigError, load_config
from train.smoke_data import build_smoke_set

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "train" / "configs" / "smoke.yaml"
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (requirements-train.txt)")
ONE_STEP = "phases=[{name: one, steps: 1, min_face_size: 32, prompt_mode: caption, text_dropout: 0.5}]"


@pytest.fixture(scope="module")
def smoke_set():
    return build_smoke_set(ROOT / ".cache" / "smoke")


def _config(tmp_path, *overrides):
    return load_config(
        SMOKE,
        [f"output_dir={tmp_path}", "tensorboard=false", "sample.every=0", ONE_STEP, "checkpoint.every=1", *overrides],
    )


# ------------------------------------------------------------------ fp8 storage
def test_fp8_linear_matches_its_dequantised_weight_and_keeps_no_cast_copy():
    from train.lean import FP8StorageLinear

    torch.manual_seed(0)
    linear = nn.Linear(64, 48).to(torch.bfloat16)
    linear.weight.data *= 0.01  # small weights: the per-tensor scale keeps them out of e4m3fn's subnormals
    fp8 = FP8StorageLinear(linear, torch.float8_e4m3fn)
    assert fp8.weight.dtype == torch.float8_e4m3fn and not fp8.weight.requires_grad
    dequantised = fp8.weight.float() * fp8.weight_scale
    rel = (dequantised - linear.weight.float()).abs().max() / linear.weight.float().abs().max()
    assert rel < 0.07  # e4m3fn: 3 mantissa bits
    x = torch.randn(5, 64, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fp8(x)
    assert all(t.dtype in (torch.float8_e4m3fn, torch.float32) for t in saved)  # fp8 weight + scale, nothing cast
    cast = fp8.weight.to(torch.bfloat16) * fp8.weight_scale.to(torch.bfloat16)  # cast on use, in the input's dtype
    torch.testing.assert_close(out, torch.nn.functional.linear(x.detach(), cast, linear.bias))
    out.float().square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x_ref, cast, linear.bias).float().square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast it computes in the autocast dtype
        assert fp8(torch.randn(2, 64)).dtype == torch.bfloat16


def test_fp8_storage_of_the_tiny_flux(smoke_set):
    from diffusers import FluxTransformer2DModel

    from train.lean import FP8StorageLinear, store_frozen_fp8

    flux = FluxTransformer2DModel.from_pretrained(smoke_set / "tiny-flux" / "transformer", torch_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="freeze the transformer first"):
        store_frozen_fp8(flux)
    flux.requires_grad_(False)
    before = sum(p.numel() * p.element_size() for p in flux.parameters())
    linears = sum(
        isinstance(m, nn.Linear)
        for b in [*flux.transformer_blocks, *flux.single_transformer_blocks]
        for m in b.modules()
    )
    assert store_frozen_fp8(flux) == linears > 0
    assert sum(isinstance(m, FP8StorageLinear) for m in flux.modules()) == linears
    assert flux.dtype == torch.bfloat16  # diffusers reads the dtype from the first parameter: an embedder
    assert sum(p.numel() * p.element_size() for p in flux.parameters()) < 0.6 * before
    with pytest.raises(ValueError, match="not available"):
        store_frozen_fp8(flux, "fp4")


# ------------------------------------------------------------------ 8-bit optimizer
def test_missing_bitsandbytes_is_a_clear_error(monkeypatch):
    from train.config import OptimConfig
    from train.lean import build_optimizer

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install 'bitsandbytes"):
        build_optimizer([nn.Parameter(torch.zeros(3))], OptimConfig(name="adamw8bit"), 1e-3)


# every way the trainer and the core pull bitsandbytes in: directly, through peft, and through diffusers (which
# imports peft whenever it is installed: `from diffusers import FluxTransformer2DModel` alone used to try)
NETWORK_FREE_IMPORTS = {
    "train.lean": "from train.lean import bitsandbytes, peft\npeft()\nassert hasattr(bitsandbytes().optim, 'AdamW8bit')\n",
    # the host's import of diffusers is what is checked: an empty state dict fails right after it
    "diffusers host": "from withanyone_core.hosts.diffusers import flux_from_bfl_state\n"
    "try:\n    flux_from_bfl_state({})\nexcept Exception:\n    pass\n",
    "tiny training models": "import tempfile\nfrom withanyone_core.testing.tiny_train import build_tiny_flux_folder\n"
    "build_tiny_flux_folder(tempfile.mkdtemp())\n",
    "memory accounting": "from train.memory import decoder_activations\nimport torch\n"
    "decoder_activations(dict(latent_channels=16, block_out_channels=(32, 32), layers_per_block=1, "
    "down_block_types=('DownEncoderBlock2D',) * 2, up_block_types=('UpDecoderBlock2D',) * 2, "
    "norm_num_groups=8), 1, 64, 64, torch.float32)\n",
}


@needs_bnb
@pytest.mark.parametrize("entry", sorted(NETWORK_FREE_IMPORTS))
def test_importing_bitsandbytes_peft_or_diffusers_reaches_no_network(entry):
    """bitsandbytes 0.50 asks the hub for a CPU kernel at import (on AVX512-BF16 CPUs); no import path of the
    trainer or the core may. A fresh interpreter (transformers imported first, as in the trainer) records every
    connect, and bitsandbytes' own complaint about the failed download must not appear either."""
    import subprocess

    code = (
        "import socket, sys\n"
        "attempts = []\n"
        "def refuse(*args, **kwargs):\n"
        "    attempts.append(repr(args)[:80])\n"
        "    raise OSError('network refused by the test')\n"
        "socket.getaddrinfo = socket.create_connection = refuse\n"
        "socket.socket.connect = socket.socket.connect_ex = refuse\n"
        "import transformers\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})\n"
        + NETWORK_FREE_IMPORTS[entry]
        + "assert 'bitsandbytes' in sys.modules\n"
        "print('ATTEMPTS', attempts)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ATTEMPTS []" in result.stdout, result.stdout + result.stderr[-2000:]
    assert "kernels-community" not in result.stderr, result.stderr[-2000:]


@needs_bnb
def test_adamw8bit_follows_adamw_on_cpu():
    from train.config import OptimConfig
    from train.lean import build_optimizer

    results = {}
    for name in ("adamw", "adamw8bit"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
        opt = build_optimizer(list(model.parameters()), OptimConfig(name=name), 1e-3)
        x, y = torch.randn(32, 64), torch.randn(32, 64)
        for _ in range(30):
            loss = (model(x) - y).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        results[name] = float(loss.detach())
    assert abs(results["adamw8bit"] - results["adamw"]) < 0.02 * results["adamw"]


# ------------------------------------------------------------------ adapter LoRA merge
def test_merged_adapter_equals_the_adapter_with_its_lora(tmp_path):
    from train.lean import MergedAdapterView, adapter_lora_pattern, add_adapter_lora, has_adapter_lora
    from train.models import BRANCH_PREFIXES
    from withanyone_core.adapter import AdapterConfig, IdentityAdapter
    from withanyone_core.checkpoints.adapter_files import load_adapter, save_adapter
    from withanyone_core.layout import TokenGrid

    torch.manual_seed(0)
    cfg = AdapterConfig(hidden_size=128, num_heads=2, num_double_blocks=1, num_single_blocks=1, siglip_dim=32)
    adapter = IdentityAdapter(cfg)
    plain_keys = {k: v.shape for k, v in adapter.state_dict().items()}
    params = add_adapter_lora(adapter, BRANCH_PREFIXES["arcface"], rank=4, alpha=8.0, frozen=torch.float32)
    assert has_adapter_lora(adapter) and all(p.dtype == torch.float32 and p.requires_grad for p in params)
    trained = {n for n, p in adapter.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n and n.startswith(BRANCH_PREFIXES["arcface"]) for n in trained)
    assert not any(n.startswith("ipa_sig") and ".lora_" in n for n, _ in adapter.named_parameters())
    import re

    assert re.fullmatch(adapter_lora_pattern(("ipa_arc.",)), "ipa_arc.3.to_kv")
    with torch.no_grad():  # a trained LoRA (peft starts B at zero)
        for p in params:
            p.normal_(0.0, 0.05)
    path = tmp_path / "withanyone.safetensors"
    save_adapter(MergedAdapterView(adapter), path)
    merged = load_adapter(path)  # what ComfyUI's adapter loader calls
    assert {k: v.shape for k, v in merged.state_dict().items()} == plain_keys  # the official layout, complete
    arcface, siglip = 10 * torch.randn(1, 2, 512), torch.randn(1, 2, 256, 32)
    grid = TokenGrid.for_pixels(64, 64, padded=False)
    boxes = [[(0, 0, 32, 64), (32, 0, 64, 64)]]
    img = torch.randn(1, grid.rows * grid.cols, 128)
    with torch.no_grad():
        outs = [
            m.block_residual(i, img, m.prepare(arcface, siglip, grid, boxes, 1.0, 0.5))
            for m in (adapter, merged)
            for i in range(2)
        ]
    for a, b in zip(outs[:2], outs[2:]):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ configuration
def test_lean_keys_are_validated(smoke_set, tmp_path, monkeypatch):
    assert _config(tmp_path).train.frozen_storage == "default"  # the authors' recipe stays the default
    for override, message in (
        ("train.frozen_storage=fp8", "train.frozen_storage must be one of default, fp8_e4m3fn"),
        ("train.optimizer.name=lion", "train.optimizer.name must be one of adamw, adamw8bit"),
        ("train.adapter_lora.rank=-1", "train.adapter_lora.rank must be >= 0"),
    ):
        with pytest.raises(ConfigError, match=message):
            _config(tmp_path, override)
    with pytest.raises(ConfigError, match="train.mode=lora trains FLUX weights"):
        _config(tmp_path, "train.frozen_storage=fp8_e4m3fn", "train.mode=lora")
    monkeypatch.setenv("WITHANYONE_SHARDS", str(smoke_set / "multiid2m" / "train" / "re_*.tar"))
    stream = [f"output_dir={tmp_path}", "train.release_text_encoders=true"]
    with pytest.raises(ConfigError, match="release_text_encoders needs every caption"):
        load_config(
            ROOT / "train" / "configs" / "smoke-multiid2m.yaml",
            [*stream, "phases=[{name: c, steps: 1, prompt_mode: caption}]"],
        )
    # fixed prompts only: every caption is known up front
    load_config(
        ROOT / "train" / "configs" / "smoke-multiid2m.yaml",
        [*stream, "phases=[{name: f, steps: 1, prompt_mode: fixed, text_dropout: 0.1}]"],
    )


def test_consumer_config_combines_every_lean_mode(monkeypatch, tmp_path):
    for var in ("COMFYUI", "DATA"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    config = load_config(ROOT / "train" / "configs" / "consumer-24gb.yaml")
    assert config.models.comfyui == str(tmp_path / "comfyui") and not config.models.base  # the user's install
    t = config.train
    assert (t.mode, t.branch, t.frozen_storage, t.optimizer.name, t.adapter_lora.rank) == (
        "adapter",
        "arcface",
        "fp8_e4m3fn",
        "adamw8bit",
        64,
    )
    assert t.release_text_encoders and t.idle_branch_on_cpu and t.gradient_checkpointing
    assert config.data.batch_size == 1 and config.data.buckets == [[512, 512]]
    assert [p.steps for p in config.phases] == [20000, 20000, 20000, 5000]


# ------------------------------------------------------------------ the accounting against real tensors
def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


MODES = {
    "adapter": [],
    "adapter-arcface": ["train.branch=arcface"],
    "lora": ["train.mode=lora", "train.lora.rank=4"],
    "full": ["train.mode=full"],
    "fp8": ["train.frozen_storage=fp8_e4m3fn", "train.mixed_precision=bf16"],
    "adapter-lora": ["train.adapter_lora.rank=4", "train.mixed_precision=bf16"],
    "adamw8bit": ["train.optimizer.name=adamw8bit"],
    # every lean option (8-bit AdamW where bitsandbytes is installed, so the rest is checked without it too)
    "lean": [
        "train.branch=arcface",
        "train.frozen_storage=fp8_e4m3fn",
        f"train.optimizer.name={'adamw8bit' if HAS_BNB else 'adamw'}",
        "train.adapter_lora.rank=4",
        "train.release_text_encoders=true",
        "train.idle_branch_on_cpu=true",
        "train.gradient_checkpointing=true",
        "train.mixed_precision=bf16",
        "sample.every=1",
    ],
}


@pytest.fixture
def fresh_accelerate():
    """accelerate fixes the mixed precision once per process: each mode gets a fresh state, and leaves none."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("mode", list(MODES))
def test_static_memory_estimate_equals_the_real_tensors_after_one_step(smoke_set, tmp_path, mode, fresh_accelerate):
    """Weights, gradients and optimizer states the trainer estimates (train/memory.py, the accounting the
    bench's memory line uses) equal the bytes of the real tensors after one real optimizer step."""
    if "adamw8bit" in " ".join(MODES[mode]) and not HAS_BNB:
        missing("bitsandbytes is not installed (requirements-train.txt)")
    from train.run import Trainer

    trainer = Trainer(_config(tmp_path, *MODES[mode]))
    models, est = trainer.models, trainer.memory_estimate
    assert est is not None
    called: set[int] = set()
    handles = [m.register_forward_hook(lambda mod, *_: called.add(id(mod))) for m in models.adapter.modules()]
    seen = {}

    def after_step(optimizer, *_):
        seen["grads"] = _tensor_bytes(p.grad for p in models.denoiser.parameters() if p.grad is not None)
        seen["frozen_grads"] = [
            n for n, p in models.denoiser.named_parameters() if not p.requires_grad and p.grad is not None
        ]
        seen["states"] = _tensor_bytes(v for state in optimizer.state.values() for v in state.values())

    base = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    base.register_step_post_hook(after_step)
    trainer.run()
    for h in handles:
        h.remove()
    trainable = [p for p in models.denoiser.parameters() if p.requires_grad]
    assert est.trainable_weights == _tensor_bytes(trainable)
    assert est.gradients == seen["grads"] and not seen["frozen_grads"]
    assert est.optimizer == seen["states"]
    # frozen: every frozen tensor of the models, less the adapter modules the step never ran when they wait on
    # the CPU (train.idle_branch_on_cpu); released text encoders hold nothing
    idle = (
        [m for m in models.adapter.modules() if id(m) not in called and list(m.parameters(recurse=False))]
        if trainer.config.train.idle_branch_on_cpu
        else []
    )
    idle_ids = {id(t) for m in idle for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]}
    frozen = [
        t
        for m in (models.denoiser, models.vae, models.text, models.arcface, getattr(models.siglip, "model", None))
        if m is not None
        for t in [*m.parameters(), *m.buffers()]
        if not (isinstance(t, nn.Parameter) and t.requires_grad) and id(t) not in idle_ids
    ]
    assert est.frozen_weights == _tensor_bytes(frozen)
    if mode == "lean":
        _check_lean_run(trainer, tmp_path, smoke_set, idle)


def _check_lean_run(trainer, out: Path, smoke_set: Path, idle) -> None:
    """The all-lean run: text encoders gone, its sample written from the cached prompt, the idle branch
    on the CPU, and the checkpoint a full adapter equal to the trained adapter + LoRA."""
    from train.lean import CachedText, captions_of_run
    from train.models import TextEncoder
    from withanyone_core.checkpoints.adapter_files import load_adapter

    models, config = trainer.models, trainer.config
    assert isinstance(models.text, CachedText)
    assert set(models.text.embeddings) == set(captions_of_run(config, trainer.data.manifest))
    assert {"", config.sample.prompt} <= set(models.text.embeddings)
    assert (out / "samples" / "step-000001.png").is_file()
    assert idle and all(p.device.type == "cpu" for m in idle for p in m.parameters())
    assert {n.split(".")[0] for m in idle for n, _ in models.adapter.named_modules() if _ is m} <= {
        "ipa_sig",
        "siglip_in_sig",
        "arcface_in_sig",
    }
    encoder = TextEncoder(Path(config.models.base), dtype=torch.bfloat16)
    t5, pooled = encoder([config.sample.prompt])
    cached_t5, cached_pooled = models.text([config.sample.prompt])
    torch.testing.assert_close((cached_t5, cached_pooled), (t5, pooled))
    merged = load_adapter(out / "checkpoints" / "step-1" / "withanyone.safetensors", dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    arcface = 10 * torch.randn(1, 2, 512, generator=g)
    img = torch.randn(1, 64, merged.config.hidden_size, generator=g)
    from withanyone_core.layout import TokenGrid

    grid, boxes = TokenGrid.for_pixels(128, 128, padded=False), [[(0, 0, 64, 128), (64, 0, 128, 128)]]
    siglip = torch.zeros(1, 2, 256, merged.config.siglip_dim)
    trained = models.adapter.float()
    with torch.no_grad():
        for i in range(merged.config.num_blocks):
            ours = trained.block_residual(i, img, trained.prepare(arcface, siglip, grid, boxes, 1.0, 0.0))
            theirs = merged.block_residual(i, img, merged.prepare(arcface, siglip, grid, boxes, 1.0, 0.0))
            assert ours.abs().max() > 0
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_text_encoders_leave_memory(smoke_set, tmp_path):
    """After caching, nothing references T5 or CLIP any more; a caption that was not cached is a clear error."""
    from train.lean import CachedText, cache_and_release_text, captions_of_run
    from train.models import load_models

    config = _config(tmp_path, "train.release_text_encoders=true")
    models = load_models(config)
    t5 = weakref.ref(models.text.t5)
    captions = captions_of_run(config)
    assert captions == [""]  # no manifest given: only the dropped caption of a caption phase
    cached = cache_and_release_text(models, ["two people", ""], "cpu")
    gc.collect()
    assert t5() is None and isinstance(models.text, CachedText) and cached is models.text
    with pytest.raises(RuntimeError, match="was not cached before the text encoders were released"):
        models.text(["a caption nobody listed"])


# ------------------------------------------------------------------ FLUX.1-dev size
def test_a_mode_fits_22_gb_at_flux_dev_size():
    """The bench's memory line (tests/bench/bench_train.py): adapter-lean at FLUX.1-dev, 512², batch 1."""
    sys.path.insert(0, str(ROOT / "tests"))
    from bench.bench_train import flux_dev_memory

    rows = flux_dev_memory(labels=("adapter", "adapter-lean"))
    lean, adapter = rows[("adapter-lean", 0)], rows[("adapter", 0)]
    assert lean.total <= 22e9 < adapter.total
    assert lean.frozen_weights < 0.5 * adapter.frozen_weights  # fp8 FLUX, no T5/CLIP, the SigLIP branch on the CPU
    assert lean.optimizer < 0.02 * adapter.optimizer  # LoRA rank 64 (59 M parameters), 8-bit states


def test_gpu_check_lean_measurement_runs_at_tiny_size():
    """tests/gpu/gpu_check.py's lean-mode measurement (run at FLUX.1-dev size where CUDA exists), on the CPU."""
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "gpu")]
    import gpu_check

    result = gpu_check.lean_training_peak("cpu", tiny=True)
    assert len(result["losses"]) == 3 and all(torch.isfinite(torch.tensor(result["losses"])))
    assert result["estimate"].static > 0 and result["estimate"].activations > 0 and result["peak"] == 0
    assert result["optimizer"] == ("adamw8bit" if HAS_BNB else "adamw")


def test_lean_run_resumes_bit_identically(smoke_set, tmp_path, fresh_accelerate):
    """fp8 FLUX, adapter LoRA and the 8-bit optimizer's states survive a checkpoint: a resumed run's losses equal
    an uninterrupted run's."""
    import json
    import shutil

    from train import run

    lean = [o for o in MODES["lean"] if not o.startswith("sample.")]
    phases = "phases=[{name: two, steps: 2, min_face_size: 32, text_dropout: 0.5}]"
    # mixed precision is fixed per process by accelerate: resetting it between the runs keeps bf16
    from accelerate.state import AcceleratorState

    def train(out):
        AcceleratorState._reset_state(reset_partial_state=True)
        run.main(
            [
                "--config",
                str(SMOKE),
                *[
                    a
                    for o in (
                        f"output_dir={out}",
                        "tensorboard=false",
                        "sample.every=0",
                        "checkpoint.every=1",
                        "checkpoint.keep=3",
                        phases,
                        *lean,
                    )
                    for a in ("--set", o)
                ],
            ]
        )

    def losses(out):
        return [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]

    train(tmp_path / "full")
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-2")
    train(tmp_path / "resumed")
    assert len(losses(tmp_path / "full")) == 2 and losses(tmp_path / "resumed") == losses(tmp_path / "full")


def test_adapter_activations_under_checkpointing_are_one_blocks_worth():
    """The adapter's residual runs in each block's forward hook, inside the checkpointed call: with gradient
    checkpointing only the block being recomputed holds its adapter activations (without it, every block does)."""
    from train.memory import _adapter_block_activations, transformer_activations
    from withanyone_core.adapter import AdapterConfig
    from withanyone_core.testing.tiny_train import flux_transformer_config

    flux = flux_transformer_config(num_layers=2, num_single_layers=2, num_heads=2, text_dim=32)
    adapter = AdapterConfig(hidden_size=128, num_heads=2, num_double_blocks=2, num_single_blocks=2, siglip_dim=32)
    one_block = _adapter_block_activations(adapter, ("arc",), 1, 256, 2, torch.bfloat16)
    assert one_block > 0
    for ckpt, blocks in ((True, 1), (False, 4)):
        bare = transformer_activations(flux, 1, 256, 256, 32, torch.bfloat16, ckpt)
        with_adapter = transformer_activations(flux, 1, 256, 256, 32, torch.bfloat16, ckpt, adapter_config=adapter)
        assert with_adapter - bare == blocks * one_block
    lora = _adapter_block_activations(adapter, ("arc",), 1, 256, 2, torch.bfloat16, lora_rank=4)
    assert lora > one_block  # LoRA keeps its rank-4 intermediates too
    fp8 = transformer_activations(flux, 1, 256, 256, 32, torch.bfloat16, False, frozen_storage="fp8_e4m3fn")
    plain = transformer_activations(flux, 1, 256, 256, 32, torch.bfloat16, False)
    assert 0 <= fp8 - plain <= 4 * 40  # the fp8 layers keep their weight (a parameter) and 4-byte scale, no cast copy
