"""Training from a ComfyUI install: its folders, extra_model_paths.yaml, file formats and errors.

The model files are tiny and built here in the layouts users have them (tests/support/comfyui_install.py);
tokenizers come from the real ComfyUI 0.3.75 tree, and ComfyUI's own extra_model_paths.yaml reader
is the reference for ours. The end-to-end test trains from such a folder and loads the result in
a real ComfyUI through the pack's loader.
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from support.comfy_env import import_comfyui
from support.comfyui_install import _state, build_install, clip_l, flux_bfl, fp8_variant, t5, tiny_vae, vae_to_bfl
from tools.common.get_comfyui import comfyui_dir
from train.comfyui_files import (
    ComfyUIFilesError,
    load_clip_l,
    load_flux,
    load_t5,
    load_vae,
    model_folders,
    resolve_comfyui_models,
)
from train.config import ConfigError, check_paths, load_config
from withanyone_core.layout import Layout

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def install(tmp_path_factory):
    return build_install(tmp_path_factory.mktemp("comfyui"), comfyui_dir())


def _fresh(install: Path, tmp_path: Path, faces=True) -> Path:
    """A copy of the module's install whose model folders a test may change."""
    root = tmp_path / "ComfyUI"
    shutil.copytree(install, root, symlinks=True)
    if not faces:
        shutil.rmtree(root / "models" / "insightface")
    return root


# ---------------------------------------------------------------- extra_model_paths.yaml


def test_extra_model_paths_are_read_as_comfyui_reads_them(tmp_path, monkeypatch):
    root = tmp_path / "ComfyUI"
    (root / "models").mkdir(parents=True)
    monkeypatch.setenv("SHARED_MODELS", str(tmp_path / "env-models"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (root / "extra_model_paths.yaml").write_text(
        "a111:\n"
        "  base_path: ../stable-diffusion-webui\n"  # relative to the yaml's folder
        "  unet: models/Stable-diffusion\n"  # legacy name of diffusion_models
        "  vae: models/VAE\n"
        "  clip: |\n"  # several folders, one per line
        "    models/text_encoder\n"
        "    models/clip\n"
        "shared:\n"
        "  base_path: $SHARED_MODELS\n"
        "  is_default: true\n"  # its folders go first
        "  vae: vae\n"
        "  diffusion_models: |\n"
        "    flux\n"
        "    unet\n"
        "  withanyone: withanyone\n"
        "plain:\n"  # no base_path: relative to the yaml's folder, absolute as given, ~ not expanded
        "  text_encoders: ../te\n"
        "  insightface: /opt/insightface\n"
        "  siglip: ~/siglip\n"
        "empty:\n"
    )
    ours = model_folders(root)

    folder_paths = import_comfyui()
    # ComfyUI's own reader, loaded from its file: another top-level "utils" module may already be imported
    spec = importlib.util.spec_from_file_location(
        "comfyui_extra_config", Path(folder_paths.__file__).parent / "utils" / "extra_config.py"
    )
    extra_config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extra_config)
    load_extra_path_config = extra_config.load_extra_path_config

    saved = (copy.deepcopy(folder_paths.folder_names_and_paths), folder_paths.models_dir)
    try:
        folder_paths.models_dir = str(root / "models")
        for kind in ("diffusion_models", "text_encoders", "vae"):
            names = {
                "diffusion_models": ("unet", "diffusion_models"),
                "text_encoders": ("text_encoders", "clip"),
                "vae": ("vae",),
            }[kind]
            folder_paths.folder_names_and_paths[kind] = ([str(root / "models" / n) for n in names], set())
        for kind in ("insightface", "siglip", "withanyone"):  # the pack's folders (nodes/loaders.py)
            folder_paths.folder_names_and_paths[kind] = ([str(root / "models" / kind)], set())
        load_extra_path_config(str(root / "extra_model_paths.yaml"))
        theirs = {k: [Path(p) for p in v[0]] for k, v in folder_paths.folder_names_and_paths.items()}
    finally:
        folder_paths.folder_names_and_paths.clear()
        folder_paths.folder_names_and_paths.update(saved[0])
        folder_paths.models_dir = saved[1]
    for kind in ("diffusion_models", "text_encoders", "vae", "insightface", "siglip", "withanyone"):
        assert ours[kind] == theirs[kind], kind
    assert ours["diffusion_models"][:2] == [tmp_path / "env-models" / "unet", tmp_path / "env-models" / "flux"]
    assert tmp_path / "stable-diffusion-webui" / "models" / "clip" in ours["text_encoders"]


def test_files_in_extra_folders_are_found(install, tmp_path):
    root = _fresh(install, tmp_path)
    elsewhere = tmp_path / "shared" / "vae-models"
    elsewhere.mkdir(parents=True)
    (root / "models" / "vae" / "ae.safetensors").rename(elsewhere / "ae.safetensors")
    with pytest.raises(
        ComfyUIFilesError,
        match=r"models.vae: no FLUX.1 autoencoder \(ae.safetensors, 16 latent channels\) in .*models/vae",
    ):
        resolve_comfyui_models(root)
    (root / "extra_model_paths.yaml").write_text(f"mine:\n  base_path: {tmp_path / 'shared'}\n  vae: vae-models\n")
    assert resolve_comfyui_models(root).vae == elsewhere / "ae.safetensors"


# ---------------------------------------------------------------- choosing files


def test_every_file_is_found_by_its_content(install):
    found = resolve_comfyui_models(install, need_antelopev2=True, need_siglip=True)
    models = install / "models"
    assert found.transformer == models / "diffusion_models" / "flux1-dev.safetensors"
    assert found.vae == models / "vae" / "ae.safetensors"
    assert found.clip_l == models / "text_encoders" / "clip_l.safetensors"
    assert found.t5 == models / "text_encoders" / "t5xxl_fp16.safetensors"
    assert found.antelopev2 == models / "insightface"
    assert found.siglip == models / "siglip" / "siglip-tiny"


def test_several_candidates_fail_listing_them_and_a_name_or_path_chooses(install, tmp_path):
    root = _fresh(install, tmp_path)
    te = root / "models" / "text_encoders"
    shutil.copy(te / "t5xxl_fp16.safetensors", te / "t5xxl_fp8_e4m3fn.safetensors")
    (root / "models" / "unet" / "flux").mkdir(parents=True)
    shutil.copy(
        root / "models" / "diffusion_models" / "flux1-dev.safetensors",
        root / "models" / "unet" / "flux" / "flux1-dev-fp8.safetensors",
    )
    with pytest.raises(
        ComfyUIFilesError,
        match=r"models.transformer: 2 candidates .*flux/flux1-dev-fp8.safetensors, "
        r"flux1-dev.safetensors; choose one with models.transformer=",
    ):
        resolve_comfyui_models(root)
    with pytest.raises(
        ComfyUIFilesError,
        match=r"models.t5: 2 candidates .*t5xxl_fp16.safetensors, "
        r"t5xxl_fp8_e4m3fn.safetensors",
    ):
        resolve_comfyui_models(root, transformer="flux1-dev.safetensors")
    found = resolve_comfyui_models(
        root, transformer="flux/flux1-dev-fp8.safetensors", t5=str(te / "t5xxl_fp8_e4m3fn.safetensors")
    )
    assert found.transformer == root / "models" / "unet" / "flux" / "flux1-dev-fp8.safetensors"
    assert found.t5 == te / "t5xxl_fp8_e4m3fn.safetensors"
    with pytest.raises(
        ComfyUIFilesError,
        match=r"models.clip_l=clip_g.safetensors is not in .*text_encoders.*"
        r"found: clip_l.safetensors",
    ):
        resolve_comfyui_models(
            root, transformer="flux1-dev.safetensors", t5="t5xxl_fp16.safetensors", clip_l="clip_g.safetensors"
        )
    with pytest.raises(ComfyUIFilesError, match=r"models.vae=.*clip_l.safetensors is not an autoencoder"):
        resolve_comfyui_models(
            root, transformer="flux1-dev.safetensors", t5="t5xxl_fp16.safetensors", vae=str(te / "clip_l.safetensors")
        )


def test_files_that_do_not_fit_the_flux_are_skipped_and_named(install, tmp_path):
    root = _fresh(install, tmp_path)
    te = root / "models" / "text_encoders"
    save_file(_state(clip_l(hidden=48)), str(te / "clip_g.safetensors"))  # another CLIP width
    (te / "notes.txt").write_text("not a model")
    (te / "put_text_encoder_files_here").write_text("")  # ComfyUI's placeholder: never listed
    (root / "models" / "vae" / "sd-vae.safetensors").write_bytes(b"broken")
    from diffusers import AutoencoderKL

    coarse = AutoencoderKL(
        latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 32),
        layers_per_block=1,
    )
    save_file(_state(coarse), str(root / "models" / "vae" / "coarse.safetensors"))
    found = resolve_comfyui_models(root)  # the width tells CLIP-L from the other CLIP
    assert found.clip_l == te / "clip_l.safetensors" and found.vae.name == "ae.safetensors"
    (te / "clip_l.safetensors").unlink()
    with pytest.raises(ComfyUIFilesError) as err:
        resolve_comfyui_models(root)
    message = str(err.value)
    assert "models.clip_l: no CLIP-L" in message and str(te) in message
    assert "clip_g.safetensors (width 48 where the FLUX file takes 32)" in message
    assert "notes.txt (not .safetensors)" in message and "put_text_encoder_files_here" not in message
    (root / "models" / "vae" / "ae.safetensors").unlink()
    with pytest.raises(
        ComfyUIFilesError,
        match=r"skipped: coarse.safetensors \(an autoencoder with 2x smaller "
        r"latents \(FLUX's has 8x\)\); sd-vae.safetensors \(unreadable",
    ):
        resolve_comfyui_models(root)


def test_missing_files_fail_naming_the_folders_searched(install, tmp_path):
    root = _fresh(install, tmp_path, faces=False)
    shutil.rmtree(root / "models" / "diffusion_models")
    with pytest.raises(
        ComfyUIFilesError,
        match=r"models.transformer: no FLUX.1 transformer .* in "
        r".*models/unet \(missing\), .*models/diffusion_models \(missing\)",
    ):
        resolve_comfyui_models(root)
    root = _fresh(install, tmp_path / "2", faces=False)
    assert resolve_comfyui_models(root).antelopev2 is None  # only needed by the ID losses
    with pytest.raises(ComfyUIFilesError, match=r"models.antelopev2: no antelopev2 face models in .*insightface"):
        resolve_comfyui_models(root, need_antelopev2=True)
    shutil.rmtree(root / "comfy")
    with pytest.raises(ComfyUIFilesError, match=r"comfy/sd1_tokenizer does not exist; the CLIP tokenizer is taken"):
        resolve_comfyui_models(root)


def test_portable_package_folder_and_adapter_by_name(install, tmp_path):
    from withanyone_core.adapter import AdapterConfig, IdentityAdapter
    from withanyone_core.checkpoints.adapter_files import save_adapter

    portable = tmp_path / "ComfyUI_windows_portable"
    portable.mkdir()
    root = _fresh(install, portable)  # <portable>/ComfyUI
    assert root == portable / "ComfyUI"
    adapter = IdentityAdapter(AdapterConfig(hidden_size=128, num_heads=2, num_double_blocks=1, num_single_blocks=1))
    save_adapter(adapter, root / "models" / "withanyone" / "withanyone.safetensors")
    shutil.copy(
        root / "models" / "vae" / "ae.safetensors", root / "models" / "withanyone" / "not-an-adapter.safetensors"
    )
    found = resolve_comfyui_models(portable, adapter="withanyone.safetensors")
    assert found.root == root and found.adapter == root / "models" / "withanyone" / "withanyone.safetensors"
    with pytest.raises(
        ComfyUIFilesError,
        match=r"models.adapter=not-an-adapter.safetensors .* is not a WithAnyone "
        r"adapter",
    ):
        resolve_comfyui_models(portable, adapter="not-an-adapter.safetensors")


def test_antelopev2_nested_zip_layout_is_found(install, tmp_path):
    root = _fresh(install, tmp_path)
    folder = root / "models" / "insightface" / "models" / "antelopev2"
    nested = folder / "antelopev2"
    nested.mkdir()
    for onnx in list(folder.glob("*.onnx")):
        onnx.rename(nested / onnx.name)
    assert resolve_comfyui_models(root, need_antelopev2=True).antelopev2 == root / "models" / "insightface"


# ---------------------------------------------------------------- the config


def _config(tmp_path: Path, models: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"output_dir: out\nmodels: {models}\ndata: {{manifest: m.jsonl}}\nphases: [{{name: a, steps: 1}}]\n"
    )
    return path


def test_config_comfyui_mode_resolves_names_and_excludes_base(install, tmp_path, monkeypatch):
    path = _config(tmp_path, "{base: flux-diffusers}")
    with pytest.raises(ConfigError, match=r"models.comfyui and models.base are both set.*models.base=null"):
        load_config(path, [f"models.comfyui={install}"])
    config = load_config(path, [f"models.comfyui={install}", "models.base=null", "models.t5=t5xxl_fp16.safetensors"])
    assert config.models.t5 == "t5xxl_fp16.safetensors"  # a name: looked up in the install, not next to the file
    (tmp_path / "m.jsonl").write_text("")
    check_paths(config)
    assert config.models.t5 == str(install / "models" / "text_encoders" / "t5xxl_fp16.safetensors")
    assert config.models.vae == str(install / "models" / "vae" / "ae.safetensors")
    with pytest.raises(ConfigError, match=r"set models.comfyui to your ComfyUI folder"):
        (tmp_path / "empty").mkdir()
        load_config(_config(tmp_path / "empty", "{}"))
    with pytest.raises(ConfigError, match=r"models.vae choose files of a ComfyUI install"):
        load_config(path, ["models.vae=ae.safetensors"])
    config = load_config(path, [f"models.comfyui={install}", "models.base=null", "models.t5=t5xxl_fp8.safetensors"])
    with pytest.raises(ConfigError, match=r"models.t5=t5xxl_fp8.safetensors is not in"):
        check_paths(config)


def test_shipped_comfyui_config_finds_every_file_of_an_install(install):
    from train.smoke_data import build_smoke_set

    data = build_smoke_set(ROOT / ".cache" / "smoke") / "data"
    config = load_config(
        ROOT / "train" / "configs" / "comfyui.yaml",
        [
            f"models.comfyui={install}",
            f"data.manifest={data / 'manifest.jsonl'}",
            f"data.negatives={data / 'negatives.safetensors'}",
        ],
    )
    assert config.models.base is None and config.train.mixed_precision == "bf16"
    check_paths(config)  # its phases use the ID losses: antelopev2 comes from the install's insightface/
    assert config.models.antelopev2 == str(install / "models" / "insightface")
    assert config.models.transformer == str(install / "models" / "diffusion_models" / "flux1-dev.safetensors")


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize("kind,rel", [("e4m3fn", 2**-4), ("e5m2", 2**-3), ("scaled", 2**-4), ("quantized", 2**-4)])
def test_fp8_flux_files_load_to_the_bf16_weights_within_fp8_precision(tmp_path, kind, rel):
    state = flux_bfl()
    save_file(fp8_variant(state, "bf16"), str(tmp_path / "bf16.safetensors"))
    save_file(fp8_variant(state, kind), str(tmp_path / f"{kind}.safetensors"))
    reference = load_flux(tmp_path / "bf16.safetensors", torch.float32).state_dict()
    loaded = load_flux(tmp_path / f"{kind}.safetensors", torch.float32).state_dict()
    assert loaded.keys() == reference.keys()
    smallest = {"e4m3fn": 2**-9, "e5m2": 2**-16}.get(kind, 0.0)  # subnormal steps of the fp8 formats
    for key, ref in reference.items():
        got = loaded[key]
        assert got.dtype == torch.float32
        bound = rel * ref.abs() + smallest + (ref.abs().amax() * 2**-9 if kind in ("scaled", "quantized") else 0) + 1e-7
        assert ((got - ref).abs() <= bound).all(), key
    if kind in ("scaled", "quantized"):  # the scales were applied: raw fp8 values alone would be ~448x too large
        assert loaded["x_embedder.weight"].abs().amax() < 1.0


def test_bfl_autoencoder_loads_as_the_diffusers_model_it_came_from(tmp_path):
    vae = tiny_vae()
    save_file(vae_to_bfl(_state(vae), 4), str(tmp_path / "ae.safetensors"))
    loaded = load_vae(tmp_path / "ae.safetensors", torch.float32)
    assert loaded.config.latent_channels == 16 and list(loaded.config.block_out_channels) == [32, 32, 64, 64]
    assert loaded.config.scaling_factor == pytest.approx(0.3611) and loaded.config.shift_factor == pytest.approx(0.1159)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x).latent_dist.mean, vae.encode(x).latent_dist.mean)
        z = torch.randn(1, 16, 4, 4)
        torch.testing.assert_close(loaded.decode(z).sample, vae.decode(z).sample)
    save_file(_state(vae), str(tmp_path / "diffusers-vae.safetensors"))  # the diffusers layout loads too
    again = load_vae(tmp_path / "diffusers-vae.safetensors", torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(again.decode(z).sample, vae.decode(z).sample)


def test_text_encoders_load_with_the_install_tokenizers(tmp_path):
    tree = comfyui_dir()
    clip, enc = clip_l(hidden=64).half().float(), t5(d_model=32)  # weights exactly as the fp16 file holds them
    save_file({k: v.half() for k, v in _state(clip).items()}, str(tmp_path / "clip_l.safetensors"))
    save_file(fp8_variant(_state(enc), "e4m3fn"), str(tmp_path / "t5xxl_fp8_e4m3fn.safetensors"))
    tokenizer, loaded = load_clip_l(tmp_path / "clip_l.safetensors", tree / "comfy" / "sd1_tokenizer", torch.float32)
    assert tokenizer.model_max_length == 77  # the tokenizer declares 8192; CLIP-L has 77 positions
    ids = tokenizer(
        ["two people smiling"], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():  # FLUX takes the tower's pooled output (the file's projection head is not used)
        torch.testing.assert_close(loaded(ids).pooler_output, clip.text_model(ids).pooler_output)
    t5_tokenizer, t5_loaded = load_t5(
        tmp_path / "t5xxl_fp8_e4m3fn.safetensors", tree / "comfy" / "text_encoders" / "t5_tokenizer", torch.bfloat16
    )
    assert t5_loaded.dtype == torch.bfloat16 and t5_loaded.config.num_heads == 2
    ids = t5_tokenizer(["two people smiling"], return_tensors="pt").input_ids
    with torch.no_grad():
        got = t5_loaded(ids).last_hidden_state.float()
        ref = enc(ids).last_hidden_state
    assert (got - ref).abs().max() < 0.25 * ref.abs().max()  # fp8 weights, bf16 compute
    small = t5(vocab=100, d_model=32)
    save_file(_state(small), str(tmp_path / "t5-small-vocab.safetensors"))
    with pytest.raises(ComfyUIFilesError, match=r"has 100 token embeddings but the install's tokenizer has"):
        load_t5(
            tmp_path / "t5-small-vocab.safetensors", tree / "comfy" / "text_encoders" / "t5_tokenizer", torch.float32
        )


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_trained_from_a_comfyui_folder_the_adapter_runs_in_comfyui(tmp_path):
    """Train the tiny set from a ComfyUI-layout folder (a few steps, the command line users run), then load
    withanyone.safetensors in a real ComfyUI through the pack's loader: on the same FLUX file, one sampling
    step changes the latent inside the face box and nowhere else.

    The FLUX is one ComfyUI's loader accepts (hidden 3072 = 24 heads of 128) with one double block and no
    single block, so the only path from the adapter's residual to the output is the per-token final layer:
    "nowhere else" holds exactly (with more blocks attention spreads the change over the whole image)."""
    import gc

    from train import run
    from train.smoke_data import build_smoke_set
    from withanyone_core.checkpoints.reading import load_safetensors, read_safetensors_metadata

    flux = flux_bfl(hidden=3072, heads=24, depth=1, single=0, context=64, vec=64)
    install = build_install(tmp_path / "ComfyUI", comfyui_dir(), flux=flux, t5_tokens=8)
    te = install / "models" / "text_encoders"
    save_file(
        fp8_variant(load_safetensors(te / "t5xxl_fp16.safetensors"), "e4m3fn"), str(te / "t5xxl_fp8_e4m3fn.safetensors")
    )
    del flux
    smoke = build_smoke_set(ROOT / ".cache" / "smoke")
    config = tmp_path / "train.yaml"
    config.write_text(
        f"output_dir: {tmp_path / 'run'}\n"
        f"models: {{comfyui: null}}\n"
        f"data: {{manifest: {smoke / 'data' / 'manifest.jsonl'}, negatives: {smoke / 'data' / 'negatives.safetensors'},"
        " batch_size: 1, buckets: [[128, 128]], num_workers: 0}\n"
        "train: {mode: adapter, branch: arcface, mixed_precision: bf16, optimizer: {lr: 1.0e-3}}\n"
        "checkpoint: {every: 2, keep: 1}\n"
        "tensorboard: false\n"
        "phases: [{name: recon, steps: 2, prompt_mode: fixed, min_face_size: 32}]\n"
    )
    with pytest.raises(SystemExit):  # two T5 files: the run stops before loading anything, naming them
        run.main(["--config", str(config), "--set", f"models.comfyui={install}"])
    run.main(
        [
            "--config",
            str(config),
            "--set",
            f"models.comfyui={install}",
            "--set",
            "models.t5=t5xxl_fp8_e4m3fn.safetensors",
        ]
    )
    trained = tmp_path / "run" / "checkpoints" / "step-2" / "withanyone.safetensors"
    assert read_safetensors_metadata(trained)["branch"] == "arcface"
    gc.collect()

    import_comfyui()
    import importlib
    import sys

    import comfy.sample
    import comfy.samplers
    import comfy.sd

    from support.comfy_env import import_pack

    pack = sys.modules.get("withanyone_pack") or import_pack()
    for name in ("nodes.loaders", "nodes.patch"):
        importlib.import_module(f"withanyone_pack.{name}")
    model = comfy.sd.load_diffusion_model_state_dict(
        load_safetensors(install / "models" / "diffusion_models" / "flux1-dev.safetensors"),
        model_options={"dtype": torch.bfloat16},
    )  # bf16 storage (as the file), computed in fp32 on a CPU
    adapter = pack.nodes.loaders.load_adapter_patcher(str(trained), "bf16")
    size, box = 128, (32.0, 32.0, 80.0, 96.0)  # token columns 2..4, rows 2..5
    g = torch.Generator().manual_seed(5)
    arcface = 20 * torch.randn(1, 512, generator=g)
    patched = pack.nodes.patch.apply_withanyone(
        model, adapter, arcface, None, Layout(size, size, [box]), id_weight=1.0, siglip_weight=0.0
    )

    def one_step(patcher):
        g = torch.Generator().manual_seed(11)
        cond = [
            [torch.randn(1, 8, 64, generator=g), {"pooled_output": torch.randn(1, 64, generator=g), "guidance": 4.0}]
        ]
        latent = torch.zeros(1, 16, size // 8, size // 8)
        noise = torch.randn(latent.shape, generator=g)
        return comfy.sample.sample_custom(
            patcher,
            noise,
            1.0,
            comfy.samplers.sampler_object("euler"),
            torch.tensor([1.0, 0.0]),
            cond,
            cond,
            latent,
            disable_pbar=True,
            seed=11,
        )

    plain, with_id = one_step(model), one_step(patched)
    assert torch.isfinite(with_id).all()
    inside = torch.zeros(size // 8, size // 8, dtype=torch.bool)
    inside[2 * 2 : 2 * 6, 2 * 2 : 2 * 5] = True  # latent pixels of token rows 2..5, columns 2..4
    change = (with_id - plain).abs()[0].amax(dim=0)
    assert change[~inside].max() == 0.0  # nowhere else
    assert (change[inside] > 1e-4).float().mean() > 0.9  # the face box: nearly every latent pixel moves
