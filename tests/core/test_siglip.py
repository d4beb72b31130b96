"""SigLIP encoder: the real transformers classes, preprocessing equal to SiglipImageProcessor."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from withanyone_core.checkpoints.reading import CheckpointError
from withanyone_core.siglip import SHIPPED_CONFIG, SiglipEncoder
from withanyone_core.testing.siglip import build_tiny_siglip, shipped_size_state


def _crops(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (512, 512, 3), dtype=np.uint8) for _ in range(n - 1)] + [
        rng.integers(0, 256, (333, 210, 3), dtype=np.uint8)
    ]


def test_preprocessing_equals_the_real_processor(tmp_path):
    from transformers import SiglipImageProcessor

    processor = SiglipImageProcessor.from_pretrained(SHIPPED_CONFIG)
    encoder = SiglipEncoder.load(build_tiny_siglip(tmp_path / "tiny"))
    crops = _crops()
    expected = processor(images=crops, return_tensors="pt").pixel_values
    assert torch.allclose(encoder.preprocess(crops), expected, atol=1e-5)


def test_folder_encodes_256_tokens_like_the_model(tmp_path):
    from transformers import SiglipVisionModel

    folder = build_tiny_siglip(tmp_path / "tiny")
    encoder = SiglipEncoder.load(folder)
    crops = _crops(2)
    feats = encoder.encode(crops)
    assert feats.shape == (2, 256, 32)
    reference = SiglipVisionModel.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = reference(pixel_values=encoder.preprocess(crops)).last_hidden_state
    assert torch.allclose(feats, expected, atol=1e-5)


def test_single_file_with_shipped_config_gives_256x768(tmp_path):
    # a full SiglipModel file: vision tower under "vision_model." plus a text tower
    state = {"vision_model." + k.removeprefix("vision_model."): v for k, v in shipped_size_state().items()}
    state["text_model.embeddings.token_embedding.weight"] = torch.zeros(4, 768)  # full SiglipModel files carry text too
    path = tmp_path / "siglip-base-patch16-256-i18n.safetensors"
    save_file(state, str(path))
    encoder = SiglipEncoder.load(path)
    assert encoder.encode(_crops(1)).shape == (1, 256, 768)


def test_wrong_files_are_explained(tmp_path):
    path = tmp_path / "clip.safetensors"
    save_file({"text_model.x": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="no SigLIP vision weights"):
        SiglipEncoder.load(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        SiglipEncoder.load(tmp_path / "empty")
    small = build_tiny_siglip(tmp_path / "tiny")
    state = {
        k: v
        for k, v in __import__("safetensors.torch", fromlist=["load_file"])
        .load_file(str(next(small.glob("*.safetensors"))))
        .items()
    }
    path = tmp_path / "tiny.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="does not match the SigLIP config"):
        SiglipEncoder.load(path)  # a 32-wide model against the shipped 768-wide config
