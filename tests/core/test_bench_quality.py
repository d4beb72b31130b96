"""CLIP-I/CLIP-T, aesthetic v2.5 and FID on random-weight models in their real formats.

The aesthetic and FID paths are checked against the libraries the authors call
(aesthetic-predictor-v2-5's model class, pytorch-fid's InceptionV3 wrapper) on the same weights.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from withanyone_core.bench.quality import (
    AestheticMetric,
    ClipMetric,
    FIDMetric,
    MissingWeights,
    build_inception,
    frechet_distance,
)
from withanyone_core.bench.tiny import build_random_inception, build_tiny_aesthetic, build_tiny_clip

rng = np.random.default_rng(0)
IMAGES = [rng.integers(0, 256, (180 + 20 * k, 240 - 10 * k, 3), dtype=np.uint8) for k in range(4)]


def test_clip_i_and_clip_t(tmp_path):
    clip = ClipMetric(build_tiny_clip(tmp_path / "clip"), "cpu")
    a, b = IMAGES[0], IMAGES[1]
    assert clip.clip_i(a, a) == pytest.approx(1.0, abs=1e-6)
    assert clip.clip_i(a, b) == pytest.approx(clip.clip_i(b, a), abs=1e-6) and clip.clip_i(a, b) < 1 - 1e-4
    rgba = np.concatenate([a, np.full(a.shape[:2] + (1,), 255, np.uint8)], -1)
    assert clip.clip_i(a, rgba) == pytest.approx(1.0, abs=1e-6)  # alpha dropped
    # the processor's 224 px centre crop: pixels outside it do not change the features
    middle = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    wide = np.concatenate([np.zeros((224, 200, 3), np.uint8), middle, np.zeros((224, 200, 3), np.uint8)], 1)
    outside = wide.copy()
    outside[:, :100] = 255  # short side already 224: no resize, the crop is the middle 224 columns
    assert clip.clip_i(wide, outside) == pytest.approx(1.0, abs=1e-6)
    short, long = "two friends at a cafe", "two friends at a cafe " + "and more words " * 40
    assert -1 <= clip.clip_t(a, short) <= 1
    tokens = clip.tokenizer([long], padding=True, truncation=True, max_length=77)["input_ids"][0]
    assert len(tokens) == 77  # long prompts are truncated as the authors' tokenizer call does
    assert np.isfinite(clip.clip_t(a, long))


def test_aesthetic_equals_the_authors_predictor(tmp_path):
    from aesthetic_predictor_v2_5 import AestheticPredictorV2_5Model
    from safetensors.torch import load_file
    from transformers import SiglipImageProcessor

    encoder, head = build_tiny_aesthetic(tmp_path / "siglip", tmp_path / "aesthetic_predictor_v2_5.safetensors")
    metric = AestheticMetric(encoder, head, "cpu")
    reference = AestheticPredictorV2_5Model.from_pretrained(encoder, local_files_only=True)
    reference.layers.load_state_dict(load_file(str(head)))
    reference.eval()
    processor = SiglipImageProcessor.from_pretrained(encoder)
    for image in IMAGES[:2]:
        with torch.no_grad():
            expected = reference(processor(images=Image.fromarray(image), return_tensors="pt").pixel_values).logits
        assert metric(image) == pytest.approx(float(expected.squeeze()), abs=1e-5)
    with pytest.raises(MissingWeights, match="aesthetic_predictor_v2_5"):
        AestheticMetric(encoder, tmp_path / "missing.safetensors", "cpu")


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    return build_random_inception(tmp_path_factory.mktemp("fid") / "pt_inception-2015-12-05-6726825d.safetensors")


def _pytorch_fid_network(weights):
    """pytorch-fid's InceptionV3 wrapper around the same weights (its constructor would download them)."""
    from pytorch_fid import inception as pf
    from safetensors.torch import load_file

    net = pf._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = (
        pf.FIDInceptionA(192, 32),
        pf.FIDInceptionA(256, 64),
        pf.FIDInceptionA(288, 64),
    )
    net.Mixed_6b, net.Mixed_6c = pf.FIDInceptionC(768, 128), pf.FIDInceptionC(768, 160)
    net.Mixed_6d, net.Mixed_6e = pf.FIDInceptionC(768, 160), pf.FIDInceptionC(768, 192)
    net.Mixed_7b, net.Mixed_7c = pf.FIDInceptionE_1(1280), pf.FIDInceptionE_2(2048)
    net.load_state_dict(load_file(str(weights)))
    wrapper = pf.InceptionV3.__new__(pf.InceptionV3)
    torch.nn.Module.__init__(wrapper)
    wrapper.resize_input, wrapper.normalize_input, wrapper.output_blocks, wrapper.last_needed_block = True, True, [3], 3
    wrapper.blocks = torch.nn.ModuleList(
        [
            torch.nn.Sequential(net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, torch.nn.MaxPool2d(3, 2)),
            torch.nn.Sequential(net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, torch.nn.MaxPool2d(3, 2)),
            torch.nn.Sequential(
                net.Mixed_5b,
                net.Mixed_5c,
                net.Mixed_5d,
                net.Mixed_6a,
                net.Mixed_6b,
                net.Mixed_6c,
                net.Mixed_6d,
                net.Mixed_6e,
            ),
            torch.nn.Sequential(net.Mixed_7a, net.Mixed_7b, net.Mixed_7c, torch.nn.AdaptiveAvgPool2d((1, 1))),
        ]
    )
    return wrapper.eval()


def test_fid_features_equal_pytorch_fid_and_the_authors_form(inception):
    from torchvision import transforms

    metric = FIDMetric(inception, "cpu")
    assert metric.variant == "fid"
    reference = _pytorch_fid_network(inception)
    image = IMAGES[0]
    with torch.no_grad():
        standard = reference(transforms.ToTensor()(Image.fromarray(image))[None])[0].flatten(1)
        authors_tf = transforms.Compose(
            [
                transforms.Resize(299),
                transforms.CenterCrop(299),
                transforms.ToTensor(),
                transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            ]
        )
        authors = reference(authors_tf(Image.fromarray(image))[None])[0].flatten(1)
    assert np.allclose(metric.features([image], "standard"), standard.double().numpy(), atol=1e-4)
    assert np.allclose(metric.features([image], "authors"), authors.double().numpy(), atol=1e-4)
    assert not np.allclose(standard, authors, atol=1e-2)  # the double normalisation changes the features
    assert metric(IMAGES[:2], IMAGES[:2], "standard") == pytest.approx(0.0, abs=1e-6)
    assert metric(IMAGES[:2], IMAGES[2:], "authors") > 0


def test_fid_trace_equals_scipy_sqrtm():
    from scipy import linalg

    for n1, n2, dim in ((6, 9, 40), (120, 100, 12)):  # fewer samples than dimensions, and more
        a = rng.standard_normal((n1, dim))
        b = 1.3 * rng.standard_normal((n2, dim)) + 0.2
        s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        covmean = linalg.sqrtm(s1 @ s2).real
        expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
        assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_torchvision_inception_weights_are_read_too(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models.inception import Inception3

    state = Inception3(num_classes=1000, aux_logits=True, init_weights=False).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "inception_v3_google.safetensors"))
    metric = FIDMetric(tmp_path / "inception_v3_google.safetensors", "cpu")
    assert metric.variant == "torchvision" and len(build_inception("torchvision").state_dict()) < len(state)
    with pytest.raises(MissingWeights, match="pt_inception-2015-12-05"):
        FIDMetric(tmp_path / "nothing.safetensors")
