"""Safe loading of the adapter (official layout) and the size-aware BFL -> diffusers map."""

import ast
import json
import pickle

import pytest
import torch

from support.golden import DEFAULT_GOLDEN_DIR
from support.golden import REPO_ROOT as ROOT
from support.make_golden import UNSEEN_CONFIG, bfl_shapes, random_model
from withanyone_core.adapter import AdapterConfig, IdentityAdapter
from withanyone_core.checkpoints.adapter_files import (
    check_adapter_state,
    infer_adapter_config,
    load_adapter,
    save_adapter,
)
from withanyone_core.checkpoints.flux_keys import bfl_to_diffusers
from withanyone_core.checkpoints.reading import CheckpointError

OFFICIAL_KEYS = DEFAULT_GOLDEN_DIR / "withanyone_official_keys.json"
SMALL = AdapterConfig(hidden_size=128, num_heads=2, num_double_blocks=2, num_single_blocks=2)


def test_official_release_layout_is_accepted_exactly():
    spec = json.loads(OFFICIAL_KEYS.read_text())
    shapes = {k: tuple(v) for k, v in spec["tensors"].items()}
    assert len(shapes) == spec["num_tensors"] == 816
    config = infer_adapter_config(shapes)
    assert config == AdapterConfig()  # FLUX.1-dev: 3072, 24 heads, 19 + 38 blocks
    with torch.device("meta"):
        adapter = IdentityAdapter(config)
        state = {k: torch.empty(s) for k, s in shapes.items()}
    assert {k: tuple(v.shape) for k, v in adapter.state_dict().items()} == shapes
    assert sum(p.numel() for p in adapter.parameters()) == spec["num_params"]
    check_adapter_state(state, adapter, "withanyone.safetensors")
    loaded = load_adapter(state, device="meta")
    assert loaded.config.num_double_blocks == 19 and loaded.config.inner_dim == 1536


def test_round_trip_and_module_prefix(tmp_path):
    adapter = IdentityAdapter(SMALL)
    path = tmp_path / "a.safetensors"
    save_adapter(adapter, path)
    loaded = load_adapter(path)  # the split is recorded in the file's metadata
    assert loaded.config == SMALL
    for k, v in adapter.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    ddp = {"module." + k: v for k, v in adapter.state_dict().items()}
    assert load_adapter(ddp).config.hidden_size == 128


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".ckpt", ".pth"])
def test_pickles_are_refused(tmp_path, suffix):
    path = tmp_path / f"withanyone{suffix}"
    torch.save(IdentityAdapter(SMALL).state_dict(), path)
    with pytest.raises(CheckpointError, match="pickled checkpoints"):
        load_adapter(path)


def test_pickle_renamed_to_safetensors_is_refused(tmp_path):
    path = tmp_path / "withanyone.safetensors"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match="pickled|not a safetensors"):
        load_adapter(path)


def test_missing_unexpected_and_shapes_named(tmp_path):
    state = IdentityAdapter(SMALL).state_dict()
    del state["ipa_sig.3.to_out.weight"]
    state["ipa_arc.9.to_q.bias"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        load_adapter(state, config=SMALL)
    msg = str(err.value)
    assert "ipa_sig.3.to_out.weight" in msg and "ipa_arc.9.to_q.bias" in msg

    big = IdentityAdapter(AdapterConfig(hidden_size=192, num_heads=3, num_double_blocks=2, num_single_blocks=2))
    path = tmp_path / "other.safetensors"
    save_adapter(big, path)
    with pytest.raises(CheckpointError, match="hidden size 192"):
        load_adapter(path, config=SMALL)


def test_not_an_adapter_is_explained():
    with pytest.raises(CheckpointError, match="not a WithAnyone adapter"):
        load_adapter({"double_blocks.0.img_in.weight": torch.zeros(2, 2)})


def test_bfl_map_is_size_aware_and_complete():
    from diffusers import FluxTransformer2DModel

    cfg = UNSEEN_CONFIG
    state = random_model(cfg, torch.Generator().manual_seed(0))
    mapped = bfl_to_diffusers(state)
    model = FluxTransformer2DModel(
        in_channels=64,
        num_layers=cfg["depth"],
        num_single_layers=cfg["depth_single_blocks"],
        attention_head_dim=64,
        num_attention_heads=3,
        joint_attention_dim=cfg["context_in_dim"],
        pooled_projection_dim=cfg["vec_in_dim"],
        guidance_embeds=True,
        axes_dims_rope=(16, 24, 24),
    )
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in mapped.items()} == expected
    n_bfl = sum(v.numel() for k, v in state.items() if not k.startswith(("ipa_", "arcface_in", "siglip_in")))
    assert sum(v.numel() for v in mapped.values()) == n_bfl
    # final AdaLN halves swapped: BFL (shift, scale) -> diffusers (scale, shift)
    shift, scale = state["final_layer.adaLN_modulation.1.weight"].chunk(2)
    assert torch.equal(mapped["norm_out.linear.weight"], torch.cat([scale, shift]))


def test_bfl_map_refuses_unknown_keys():
    state = {k: torch.zeros(s) for k, s in bfl_shapes(UNSEEN_CONFIG).items()}
    state["double_blocks.0.img_attn.mystery.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="mystery"):
        bfl_to_diffusers(state)


def test_comfyui_prefixed_flux_is_accepted():
    state = {"model.diffusion_model." + k: torch.zeros(s) for k, s in bfl_shapes(UNSEEN_CONFIG).items()}
    assert "x_embedder.weight" in bfl_to_diffusers(state)


LOAD_PEAK_SCRIPT = r"""
import sys, threading, time
sys.path.insert(0, {root!r})
import torch
from withanyone_core.checkpoints.adapter_files import load_adapter

def rss_kib():  # resident memory of every kind: anonymous, and file pages of any memory map
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

peak = [0]
running = [True]
def watch():
    while running[0]:
        peak[0] = max(peak[0], rss_kib())
        time.sleep(0.002)

base = rss_kib()
thread = threading.Thread(target=watch, daemon=True)
thread.start()
adapter = load_adapter({path!r}, dtype=torch.bfloat16)
running[0] = False
thread.join()
size = sum(p.numel() * p.element_size() for p in adapter.parameters())
print("PEAK", (max(peak[0], rss_kib()) - base) * 1024, size)
"""


def test_loading_peaks_near_one_copy_of_the_adapter(tmp_path):
    """A float32 file loaded as bf16 is read tensor by tensor: the process's anonymous memory peaks near the
    converted adapter plus one tensor, not at the file plus a converted copy (the first release read the
    whole file, then converted it: ~1.5x the file size). Resident memory of a fresh process, sampled while
    it loads a ~0.5 GB random file."""
    import subprocess
    import sys

    from withanyone_core.adapter import AdapterConfig, IdentityAdapter
    from withanyone_core.checkpoints.adapter_files import save_adapter

    config = AdapterConfig(hidden_size=1024, num_heads=16, num_double_blocks=4, num_single_blocks=4)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in IdentityAdapter(config).state_dict().items()}
    path = tmp_path / "large.safetensors"
    adapter = IdentityAdapter(config)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_()
    save_adapter(adapter, path)
    del adapter
    file_bytes = path.stat().st_size
    largest = max(torch.Size(s).numel() for s in shapes.values()) * 4
    result = subprocess.run(
        [sys.executable, "-c", LOAD_PEAK_SCRIPT.format(root=str(ROOT), path=str(path))],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    peak, converted = (int(v) for v in result.stdout.split("PEAK")[1].split())
    assert converted * 2 > 0.45 * file_bytes  # the converted copy is half the float32 file
    assert peak <= converted + 1.5 * largest + 64 * 2**20, (
        f"peak {peak / 2**20:.0f} MiB for {converted / 2**20:.0f} MiB"
    )
    assert peak < 0.75 * file_bytes  # reading the whole file first would exceed the file size alone


def test_checkpoint_rooms_import_only_downwards():
    """reading <- adapter_files <- flux_keys: no room imports one above it, so there is no circle."""
    rank = {"reading": 0, "adapter_files": 1, "flux_keys": 2}
    folder = ROOT / "withanyone_core" / "checkpoints"
    assert {p.stem for p in folder.glob("*.py")} == set(rank) | {"__init__"}
    for room, level in rank.items():
        tree = ast.parse((folder / f"{room}.py").read_text())
        imported = {
            node.module.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
        }
        assert all(rank[name] < level for name in imported), (room, imported)
