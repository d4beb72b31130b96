"""MultiID-Bench image-quality metrics from local weights: CLIP-I, CLIP-T, aesthetic score v2.5, FID.

As the authors' ``MultiID-Bench/metrics/``:

- CLIP (``openai/clip-vit-base-patch16``, transformers): image features of the processor's
  224 px centre crop, text features of the prompt (padded, truncated to 77 tokens), both
  L2-normalised; CLIP-I = cos(GT, output), CLIP-T = cos(output, prompt).
- Aesthetic predictor v2.5: ``google/siglip-so400m-patch14-384`` vision tower, its pooled
  output L2-normalised, then the v2.5 scoring MLP; SigLIP's 384 px processor. The
  authors run it in bfloat16 on CUDA (here: bfloat16 on CUDA, float32 on CPU).
- FID on InceptionV3 pool features (2048-d) of GT photos against outputs, with the
  pytorch-fid network (``pt_inception-2015-12-05``) or torchvision's ImageNet weights.
  ``standard``: the image as is, bilinearly resized to 299 x 299 and scaled to [-1, 1]
  (pytorch-fid). ``authors``: resize the short side to 299, centre-crop, ImageNet
  mean/std normalisation, *then* pytorch-fid's own 2x - 1 on top (normalised twice).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from ..checkpoints.reading import CheckpointError, load_safetensors
from ..faces import to_rgb_uint8

logger = logging.getLogger(__name__)

CLIP_NAME = "openai/clip-vit-base-patch16"
AESTHETIC_ENCODER = "google/siglip-so400m-patch14-384"
AESTHETIC_HEAD = "aesthetic_predictor_v2_5.safetensors"
FID_WEIGHTS = ("pt_inception-2015-12-05-6726825d.safetensors", "inception_v3_google-0cc3c7bd.safetensors")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class MissingWeights(FileNotFoundError):
    """A metric's weights are not where they should be; the message names the file and the place."""


def _pil(image):
    from PIL import Image

    return Image.fromarray(to_rgb_uint8(np.asarray(image)))


def _hf_folder(path, what: str, needs: tuple[str, ...]) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir() or not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise MissingWeights(
            f"{what}: {path} must be a Hugging Face folder with config.json, model.safetensors and {', '.join(needs)} "
            f"(e.g. `huggingface-cli download {what} --local-dir {path}` on a machine with internet)"
        )
    return path


def _device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class ClipMetric:
    """CLIP-I and CLIP-T with a local CLIP folder (openai/clip-vit-base-patch16 in the paper)."""

    def __init__(self, folder: str | os.PathLike, device=None):
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        folder = _hf_folder(folder, CLIP_NAME, ("preprocessor_config.json", "vocab.json", "merges.txt"))
        self.device = _device(device)
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True).to(self.device).eval()
        self.processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
        self.tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)

    @staticmethod
    def _features(out) -> torch.Tensor:
        # transformers 5 returns a model output whose pooler_output is the projected feature
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def image_features(self, images) -> torch.Tensor:
        inputs = self.processor(images=[_pil(i) for i in images], return_tensors="pt")
        feats = self._features(self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device)))
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu()

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items()}
        feats = self._features(self.model.get_text_features(**tokens))
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu()

    def clip_i(self, ground_truth, output) -> float:
        a, b = self.image_features([ground_truth, output])
        return float((a * b).sum())

    def clip_t(self, output, prompt: str) -> float:
        return float((self.image_features([output])[0] * self.text_features([prompt])[0]).sum())


class AestheticMetric:
    """Aesthetic predictor v2.5: SigLIP so400m vision tower + the v2.5 scoring head, from local files."""

    def __init__(self, encoder_folder: str | os.PathLike, head_file: str | os.PathLike, device=None):
        from transformers import SiglipImageProcessor, SiglipVisionModel

        encoder_folder = _hf_folder(encoder_folder, AESTHETIC_ENCODER, ("preprocessor_config.json",))
        head_file = Path(head_file).expanduser()
        if not head_file.is_file():
            raise MissingWeights(
                f"aesthetic head {head_file} not found: convert aesthetic_predictor_v2_5.pth (github "
                f"discus0434/aesthetic-predictor-v2-5, models/) to {AESTHETIC_HEAD} and put it there"
            )
        self.device = _device(device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.encoder = SiglipVisionModel.from_pretrained(encoder_folder, local_files_only=True)
        self.processor = SiglipImageProcessor.from_pretrained(encoder_folder, local_files_only=True)
        self.head = self.build_head(self.encoder.config.hidden_size)
        state = load_safetensors(head_file)
        state = {k.removeprefix("layers."): v for k, v in state.items()}
        try:
            self.head.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(
                f"{head_file.name} is not an aesthetic v2.5 head for a {self.encoder.config.hidden_size}"
                f"-wide encoder: {exc}"
            ) from exc
        self.encoder.to(self.device, self.dtype).eval()
        self.head.to(self.device, self.dtype).eval()

    @staticmethod
    def build_head(width: int) -> torch.nn.Module:
        """The v2.5 head (keys ``scoring_head.{0,2,4,6,8}.*``); dropout is inactive at eval."""
        from torch import nn

        class Head(nn.Module):
            def __init__(self):
                super().__init__()
                self.scoring_head = nn.Sequential(
                    nn.Linear(width, 1024),
                    nn.Dropout(0.5),
                    nn.Linear(1024, 128),
                    nn.Dropout(0.5),
                    nn.Linear(128, 64),
                    nn.Dropout(0.5),
                    nn.Linear(64, 16),
                    nn.Dropout(0.2),
                    nn.Linear(16, 1),
                )

            def forward(self, x):
                return self.scoring_head(x)

        return Head()

    @torch.no_grad()
    def __call__(self, image) -> float:
        pixels = self.processor(images=_pil(image), return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        pooled = self.encoder(pixel_values=pixels).pooler_output
        pooled = pooled / pooled.norm(dim=-1, keepdim=True)
        return float(self.head(pooled).float().squeeze())


# --------------------------------------------------------------------------- FID
def _fid_blocks():
    """pytorch-fid's Inception blocks: TensorFlow-style pooling (pads not counted; max pool in the last block)."""
    import torch.nn.functional as F
    from torchvision.models import inception as tv

    def avg(x):
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

    class FIDInceptionA(tv.InceptionA):
        def _forward(self, x):
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return [self.branch1x1(x), b5, b3, self.branch_pool(avg(x))]

    class FIDInceptionC(tv.InceptionC):
        def _forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            d = x
            for layer in (
                self.branch7x7dbl_1,
                self.branch7x7dbl_2,
                self.branch7x7dbl_3,
                self.branch7x7dbl_4,
                self.branch7x7dbl_5,
            ):
                d = layer(d)
            return [self.branch1x1(x), b7, d, self.branch_pool(avg(x))]

    class FIDInceptionE(tv.InceptionE):
        def __init__(self, in_channels, pool: str):
            super().__init__(in_channels)
            self.pool = pool

        def _forward(self, x):
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
            pooled = avg(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
            return [self.branch1x1(x), b3, d, self.branch_pool(pooled)]

    return FIDInceptionA, FIDInceptionC, FIDInceptionE


def build_inception(variant: str = "fid") -> torch.nn.Module:
    """torchvision's Inception3 without weights; ``fid``: with pytorch-fid's block variants and 1008 classes."""
    from torchvision.models.inception import Inception3

    if variant == "torchvision":
        return Inception3(num_classes=1000, aux_logits=False, init_weights=False)
    if variant != "fid":
        raise ValueError(f"inception variant must be 'fid' or 'torchvision', got {variant!r}")
    net = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    A, C, E = _fid_blocks()
    net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
    net.Mixed_6b, net.Mixed_6c, net.Mixed_6d, net.Mixed_6e = C(768, 128), C(768, 160), C(768, 160), C(768, 192)
    net.Mixed_7b, net.Mixed_7c = E(1280, "avg"), E(2048, "max")
    return net


def frechet_distance(real: np.ndarray, generated: np.ndarray) -> float:
    """FID of two feature sets [n, d]: |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

    tr((S1 S2)^(1/2)) is the sum of square roots of the eigenvalues of S1 S2, which equal
    the squared singular values of A B^T / sqrt((n1 - 1)(n2 - 1)) (A, B the centred
    features). That is exact and takes milliseconds where scipy's sqrtm of the 2048 x 2048
    product (pytorch-fid's route) takes a minute; with more samples than dimensions the
    symmetric form S1^(1/2) S2 S1^(1/2) is used. tests/core/test_bench_quality.py checks both
    against scipy.linalg.sqrtm.
    """
    a = np.asarray(real, np.float64)
    b = np.asarray(generated, np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    a, b = a - mu1, b - mu2
    n1, n2, dim = len(a), len(b), a.shape[1]
    tr1, tr2 = (a * a).sum() / (n1 - 1), (b * b).sum() / (n2 - 1)
    if min(n1, n2) < dim:
        tr_covmean = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    else:
        s1, s2 = a.T @ a / (n1 - 1), b.T @ b / (n2 - 1)
        w, v = np.linalg.eigh(s1)
        root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root @ s2 @ root), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + tr1 + tr2 - 2 * tr_covmean)


class FIDMetric:
    """FID of two image sets on InceptionV3 2048-d pool features."""

    def __init__(self, weights: str | os.PathLike, device=None, batch_size: int = 32):
        weights = Path(weights).expanduser()
        if not weights.is_file():
            raise MissingWeights(
                f"FID weights {weights} not found: convert pytorch-fid's {FID_WEIGHTS[0].replace('.safetensors', '.pth')} "
                f"(or torchvision's inception_v3_google-0cc3c7bd.pth) to safetensors and give its path"
            )
        state = load_safetensors(weights)
        state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
        classes = state.get("fc.weight", torch.zeros(0)).shape[0]
        self.variant = "fid" if classes == 1008 else "torchvision"
        self.net = build_inception(self.variant)
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{weights.name} is not InceptionV3 weights (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        self.device = _device(device)
        self.net.to(self.device).eval()
        self.batch_size = batch_size

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        for layer in (
            n.Conv2d_1a_3x3,
            n.Conv2d_2a_3x3,
            n.Conv2d_2b_3x3,
            n.maxpool1,
            n.Conv2d_3b_1x1,
            n.Conv2d_4a_3x3,
            n.maxpool2,
            n.Mixed_5b,
            n.Mixed_5c,
            n.Mixed_5d,
            n.Mixed_6a,
            n.Mixed_6b,
            n.Mixed_6c,
            n.Mixed_6d,
            n.Mixed_6e,
            n.Mixed_7a,
            n.Mixed_7b,
            n.Mixed_7c,
        ):
            x = layer(x)
        return torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)

    @staticmethod
    def preprocess(image, form: str) -> torch.Tensor:
        """[3, H, W] input of pytorch-fid's InceptionV3 wrapper (before its resize and 2x - 1)."""
        from torchvision.transforms import functional as TF

        pil = _pil(image)
        if form == "standard":
            return TF.to_tensor(pil)
        if form == "authors":
            pil = TF.center_crop(TF.resize(pil, 299), 299)
            return TF.normalize(TF.to_tensor(pil), IMAGENET_MEAN, IMAGENET_STD)
        raise ValueError(f"FID form must be 'standard' or 'authors', got {form!r}")

    @torch.no_grad()
    def features(self, images, form: str = "standard") -> np.ndarray:
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = [self.preprocess(i, form) for i in images[start : start + self.batch_size]]
            # 'standard' keeps each image's own size until the wrapper's bilinear resize
            x = torch.cat(
                [
                    torch.nn.functional.interpolate(t[None], size=(299, 299), mode="bilinear", align_corners=False)
                    for t in batch
                ]
            )
            out.append(self._blocks((2 * x - 1).to(self.device)).cpu().double().numpy())
        return np.concatenate(out)

    def __call__(self, real, generated, form: str = "standard") -> float:
        if len(real) < 2 or len(generated) < 2:
            raise ValueError("FID needs at least two images on each side")
        return frechet_distance(self.features(real, form), self.features(generated, form))
