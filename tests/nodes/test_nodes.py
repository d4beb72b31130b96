"""WithAnyone nodes inside the real ComfyUI modules (in-process)."""

import asyncio
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from support.comfy_env import ROOT, import_comfyui, import_pack


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    folder_paths = import_comfyui(models)
    pack = import_pack()
    nodes = asyncio.run(asyncio.run(pack.comfy_entrypoint()).get_node_list())
    return folder_paths, {n.GET_SCHEMA().node_id: n for n in nodes}, models


def test_importing_the_pack_loads_nothing_heavy():
    code = (
        "import sys, importlib.util; sys.path.insert(0, {0!r});"
        "spec = importlib.util.spec_from_file_location('pack', {1!r}, submodule_search_locations=[{0!r}]);"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m);"
        "heavy = [n for n in ('torch', 'insightface', 'onnxruntime', 'transformers', 'diffusers') if n in sys.modules];"
        "print(heavy, m.WEB_DIRECTORY)"
    ).format(str(ROOT), str(ROOT / "__init__.py"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] ./web"


# Run in a fresh process: ComfyUI's own loader imports the pack from a custom_nodes folder while the names the
# pack's folder would add (its library, trainer, tools, tests) cannot be imported by name, as in a ComfyUI
# install that has not pip-installed the pack. A node module that imported the core by name would fail here.
_LOAD_AS_COMFYUI_DOES = """
import asyncio, importlib.abc, json, sys
BLOCKED = ("withanyone_core", "train", "tools", "tests", "support")

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{fullname} imported by name", name=fullname)

sys.meta_path.insert(0, Blocker())
comfyui, pack = sys.argv[1:3]
sys.path.insert(0, comfyui)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import nodes
loaded = asyncio.run(nodes.load_custom_node(pack))
layout_node = nodes.NODE_CLASS_MAPPINGS["WithAnyoneLayout"]
layout = layout_node.execute(1024, 768, "preset", 3, "", None, None).result[0]
print(json.dumps({
    "loaded": loaded,
    "nodes": sorted(n for n in nodes.NODE_CLASS_MAPPINGS if n.startswith("WithAnyone")),
    "layout_type": type(layout).__module__,
    "people": layout.num_persons,
    "pack_on_path": pack in sys.path,
}))
"""


def test_the_pack_runs_without_its_folder_on_sys_path(comfy, tmp_path):
    from support.comfy_env import comfyui_dir

    custom_nodes = tmp_path / "custom_nodes"
    custom_nodes.mkdir()
    pack = custom_nodes / "ComfyUI-WithAnyone"
    pack.symlink_to(ROOT, target_is_directory=True)
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_AS_COMFYUI_DOES, str(comfyui_dir()), str(pack)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    _, listed, _ = comfy
    assert report["loaded"] is True and report["nodes"] == sorted(listed)
    assert report["layout_type"].endswith("ComfyUI-WithAnyone.withanyone_core.layout.value")
    assert report["people"] == 3
    assert report["pack_on_path"] is False


def test_entrypoint_lists_v3_nodes_with_prefixed_ids(comfy):
    _, nodes, _ = comfy
    assert set(nodes) >= {"WithAnyoneAdapterLoader", "WithAnyoneFaceAnalyzerLoader", "WithAnyoneLayout"}
    for node_id, node in nodes.items():
        schema = node.GET_SCHEMA()
        assert node_id.startswith("WithAnyone") and schema.category.startswith("WithAnyone")


def test_model_folders_registered_keeping_user_paths(comfy):
    folder_paths, _, models = comfy
    assert str(models / "withanyone") in folder_paths.get_folder_paths("withanyone")
    folder_paths.folder_names_and_paths["withanyone"][0].insert(0, "/elsewhere/withanyone")
    from withanyone_pack.nodes import loaders

    loaders.register_model_folders()  # registering again keeps the extra path
    assert folder_paths.get_folder_paths("withanyone")[0] == "/elsewhere/withanyone"


def test_adapter_loader_reads_models_folder(comfy):
    _, nodes, models = comfy
    from withanyone_core.adapter import AdapterConfig, IdentityAdapter
    from withanyone_core.checkpoints.adapter_files import save_adapter

    (models / "withanyone").mkdir(exist_ok=True)
    adapter = IdentityAdapter(AdapterConfig(128, 2, 1, 1))
    save_adapter(adapter, models / "withanyone" / "tiny.safetensors")
    patcher = nodes["WithAnyoneAdapterLoader"].execute("tiny.safetensors").result[0]
    loaded = patcher.model
    assert torch.equal(loaded.ipa_arc[0].to_q.weight.float(), adapter.ipa_arc[0].to_q.weight)
    with pytest.raises(FileNotFoundError):
        nodes["WithAnyoneAdapterLoader"].execute("missing.safetensors")


def test_face_analyzer_loader_and_missing_models(comfy, tmp_path):
    folder_paths, nodes, models = comfy
    with pytest.raises(FileNotFoundError, match="models/insightface/models/antelopev2"):
        nodes["WithAnyoneFaceAnalyzerLoader"].execute("auto", 0.4, 640)
    from withanyone_core.testing.faces import build_tiny_antelopev2

    build_tiny_antelopev2(models / "insightface")
    analyzer = nodes["WithAnyoneFaceAnalyzerLoader"].execute("CPU", 0.4, 640).result[0]
    assert analyzer.providers == ["CPUExecutionProvider"]


def test_layout_text_fractions_presets_and_errors(comfy):
    _, nodes, _ = comfy
    node = nodes["WithAnyoneLayout"]
    layout, preview, *_ = node.execute(1024, 768, "text", 2, "100,100,300,320\n0.5,0.1,0.75,0.45", None, None).result
    assert np.allclose(layout.boxes, [(100, 100, 300, 320), (512, 76.8, 768, 345.6)])
    assert preview.shape == (1, 384, 512, 3) and preview.dtype == torch.float32
    for people in (1, 2, 3, 4):
        layout = node.execute(1024, 1024, "preset", people, "", None, None).result[0]
        assert layout.num_persons == people
        xs = [b[0] for b in layout.boxes]
        assert xs == sorted(xs) and all(abs((b[2] - b[0]) - (b[3] - b[1])) < 1e-6 for b in layout.boxes)
    with pytest.raises(ValueError, match="line 2"):
        node.execute(512, 512, "text", 1, "10,10,50,50\n10,10,5", None, None)
    with pytest.raises(ValueError, match="x2 must exceed x1"):
        node.execute(512, 512, "text", 1, "50,10,10,50", None, None)
    with pytest.raises(ValueError, match="needs a layout_image"):
        node.execute(512, 512, "image", 1, "", None, None)


def test_layout_from_image(comfy):
    _, nodes, models = comfy
    from withanyone_core.testing.faces import build_tiny_antelopev2, make_face_image

    build_tiny_antelopev2(models / "insightface")
    analyzer = nodes["WithAnyoneFaceAnalyzerLoader"].execute("CPU", 0.4, 640).result[0]
    photo, _, _ = make_face_image([(12, 7), (4, 5)])
    image = torch.from_numpy(photo.astype(np.float32) / 255)[None]
    layout = nodes["WithAnyoneLayout"].execute(1024, 512, "image", 2, "", image, analyzer).result[0]
    assert layout.num_persons == 2 and layout.boxes[0][0] < layout.boxes[1][0]


@pytest.fixture(scope="module")
def people(comfy):
    """Tiny antelopev2 and SigLIP (768 wide, as the adapter expects) in the models folders."""
    from withanyone_core.testing.faces import build_tiny_antelopev2
    from withanyone_core.testing.siglip import build_tiny_siglip

    _, nodes, models = comfy
    build_tiny_antelopev2(models / "insightface")
    build_tiny_siglip(models / "siglip" / "tiny-siglip", hidden_size=768)
    analyzer = nodes["WithAnyoneFaceAnalyzerLoader"].execute("CPU", 0.4, 640).result[0]
    siglip = nodes["WithAnyoneSiglipLoader"].execute("tiny-siglip").result[0]
    return nodes, analyzer, siglip


def _photos(cells_and_ids):
    from withanyone_core.testing.faces import make_face_image

    images = [make_face_image(cells, identities=ids, seed=k)[0] for k, (cells, ids) in enumerate(cells_and_ids)]
    return torch.from_numpy(np.stack(images).astype(np.float32) / 255)


def test_face_extract_identity_encode(people):
    nodes, analyzer, siglip = people
    extract, encode = nodes["WithAnyoneFaceExtract"], nodes["WithAnyoneIdentityEncode"]
    alice, preview = extract.execute(_photos([([(5, 5)], [1]), ([(12, 9), (3, 14)], [1, 9])]), analyzer, -1, 32).result
    assert len(alice.photos) == 2 and preview.shape == (2, 512, 512, 3)
    bob = extract.execute(_photos([([(8, 8)], [2])]), analyzer, -1, 32).result[0]
    identities = encode.execute(siglip, alice, bob).result[0]
    assert identities.count == 2 and identities.photos_per_person == (2, 1)
    assert identities.arcface.shape == (2, 512) and identities.siglip.shape == (2, 256, 768)
    expected = np.mean([p.embedding for p in alice.photos], axis=0)  # several photos: averaged
    assert np.allclose(identities.arcface[0].numpy(), expected, atol=1e-5)


def test_face_extract_errors_name_the_photo(people):
    nodes, analyzer, _ = people
    blank = torch.full((2, 128, 128, 3), 0.4)
    with pytest.raises(ValueError, match="no face found in photo 1 of 2"):
        nodes["WithAnyoneFaceExtract"].execute(blank, analyzer, -1, 0)
    with pytest.raises(ValueError, match="smaller than 200 px"):
        nodes["WithAnyoneFaceExtract"].execute(_photos([([(5, 5)], [1])]), analyzer, -1, 200)


def test_identity_metrics_node_copy_paste_meter(people):
    import json

    nodes, analyzer, siglip = people
    extract, encode = nodes["WithAnyoneFaceExtract"], nodes["WithAnyoneIdentityEncode"]
    refs = [extract.execute(_photos([([(7, 7)], [ident])]), analyzer, -1, 0).result[0] for ident in (11, 12)]
    identities = encode.execute(siglip, *refs).result[0]
    truth = _photos([([(4, 6), (13, 6)], [1, 2])])
    out = nodes["WithAnyoneIdentityMetrics"].execute(truth, analyzer, identities, truth)
    metrics = json.loads(out.result[0])
    assert metrics["cp"] == pytest.approx(-1.0, abs=1e-3) and metrics["sim_gt"] == pytest.approx(1.0, abs=1e-4)
    assert "CP -1.000" in json.dumps(out.ui.as_dict())
