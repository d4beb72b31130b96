"""AdaFace IR-50 and FaceNet (VGGFace2) identity embeddings on facexlib-aligned faces, from local safetensors.

The authors' ``MultiID-Bench/metrics/arcface_metric.py`` aligns faces with facexlib's
``FaceRestoreHelper(face_size=112, det_model='retinaface_resnet50')``:

- RetinaFace (ResNet-50) on the BGR image at its own size, mean (104, 117, 123)
  subtracted, faces with score > 0.97, NMS 0.4, in score order;
- each face's 5 landmarks mapped by ``cv2.estimateAffinePartial2D(..., LMEDS)`` onto the
  FFHQ-style 512 px template scaled to 112 px, ``warpAffine`` to 112 x 112 with a grey
  (135, 133, 132) border: a BGR crop;
- AdaFace ir_50 (ms1mv2): the crop in BGR order, (x / 255 - 0.5) / 0.5; the model's
  normalised output;
- FaceNet InceptionResnetV1 (vggface2): the same BGR crop scaled to [0, 1] only, at 112 px
  (not the 160 px RGB standardised input FaceNet was trained on: the authors' choice, kept).

The three networks are rebuilt here with their release's parameter names, so the weights
load from safetensors converted from the releases (``adaface_ir50_ms1mv2.ckpt``'s
``state_dict`` without the ``model.`` prefix, ``20180402-114759-vggface2.pt``,
``detection_Resnet50_Final.pth``); nothing is unpickled.
"""

from __future__ import annotations

import logging
import os
from itertools import product
from math import ceil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints.reading import load_safetensors
from ..faces import to_rgb_uint8
from .faces import pad_reference
from .quality import MissingWeights

logger = logging.getLogger(__name__)

WEIGHT_FILES = {
    "adaface": "adaface_ir50_ms1mv2.safetensors",
    "facenet": "facenet_vggface2.safetensors",
    "retinaface": "detection_Resnet50_Final.safetensors",
}
RELEASES = {
    "adaface": "adaface_ir50_ms1mv2.ckpt (github mk-minchul/AdaFace; its 'state_dict' without 'model.')",
    "facenet": "20180402-114759-vggface2.pt (github timesler/facenet-pytorch releases)",
    "retinaface": "detection_Resnet50_Final.pth (github xinntao/facexlib releases v0.1.0)",
}
# facexlib FaceRestoreHelper's 5-point template for 512 px faces (eyes, nose, mouth corners)
FFHQ_TEMPLATE_512 = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.1936],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ],
    dtype=np.float64,
)
CROP_BORDER_BGR = (135, 133, 132)
DETECTION_SCORE = 0.97


# --------------------------------------------------------------------------- RetinaFace (ResNet-50)
def _conv_bn(cin, cout, kernel, relu: bool):
    layers = [nn.Conv2d(cin, cout, kernel, 1, kernel // 2, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))  # facexlib's LeakyReLU(0) at 256 channels
    return nn.Sequential(*layers)


class _SSH(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv3X3 = _conv_bn(channels, channels // 2, 3, relu=False)
        self.conv5X5_1 = _conv_bn(channels, channels // 4, 3, relu=True)
        self.conv5X5_2 = _conv_bn(channels // 4, channels // 4, 3, relu=False)
        self.conv7X7_2 = _conv_bn(channels // 4, channels // 4, 3, relu=True)
        self.conv7x7_3 = _conv_bn(channels // 4, channels // 4, 3, relu=False)

    def forward(self, x):
        mid = self.conv5X5_1(x)
        return F.relu(torch.cat([self.conv3X3(x), self.conv5X5_2(mid), self.conv7x7_3(self.conv7X7_2(mid))], 1))


class _FPN(nn.Module):
    def __init__(self, widths, channels: int):
        super().__init__()
        self.output1, self.output2, self.output3 = (_conv_bn(w, channels, 1, relu=True) for w in widths)
        self.merge1 = _conv_bn(channels, channels, 3, relu=True)
        self.merge2 = _conv_bn(channels, channels, 3, relu=True)

    def forward(self, feats):
        o1, o2, o3 = self.output1(feats[0]), self.output2(feats[1]), self.output3(feats[2])
        o2 = self.merge2(o2 + F.interpolate(o3, size=o2.shape[2:], mode="nearest"))
        o1 = self.merge1(o1 + F.interpolate(o2, size=o1.shape[2:], mode="nearest"))
        return [o1, o2, o3]


class _Head(nn.Module):
    def __init__(self, channels: int, width: int, anchors: int = 2):
        super().__init__()
        self.width = width
        self.conv1x1 = nn.Conv2d(channels, anchors * width, 1)

    def forward(self, x):
        return self.conv1x1(x).permute(0, 2, 3, 1).reshape(x.shape[0], -1, self.width)


class RetinaFaceR50(nn.Module):
    """facexlib's ``retinaface_resnet50`` (parameter names as in detection_Resnet50_Final.pth)."""

    MIN_SIZES = ((16, 32), (64, 128), (256, 512))
    STEPS = (8, 16, 32)
    VARIANCE = (0.1, 0.2)

    def __init__(self):
        super().__init__()
        from torchvision.models import resnet50
        from torchvision.models._utils import IntermediateLayerGetter

        self.body = IntermediateLayerGetter(resnet50(weights=None), {"layer2": 1, "layer3": 2, "layer4": 3})
        self.fpn = _FPN((512, 1024, 2048), 256)
        self.ssh1, self.ssh2, self.ssh3 = _SSH(256), _SSH(256), _SSH(256)
        self.ClassHead = nn.ModuleList(_Head(256, 2) for _ in range(3))
        self.BboxHead = nn.ModuleList(_Head(256, 4) for _ in range(3))
        self.LandmarkHead = nn.ModuleList(_Head(256, 10) for _ in range(3))

    def forward(self, x):
        feats = [ssh(f) for ssh, f in zip((self.ssh1, self.ssh2, self.ssh3), self.fpn(list(self.body(x).values())))]
        loc = torch.cat([h(f) for h, f in zip(self.BboxHead, feats)], 1)
        conf = torch.cat([h(f) for h, f in zip(self.ClassHead, feats)], 1)
        landmarks = torch.cat([h(f) for h, f in zip(self.LandmarkHead, feats)], 1)
        return loc, F.softmax(conf, dim=-1), landmarks

    def priors(self, height: int, width: int) -> torch.Tensor:
        rows = []
        for sizes, step in zip(self.MIN_SIZES, self.STEPS):
            for i, j in product(range(ceil(height / step)), range(ceil(width / step))):
                for size in sizes:
                    rows.append([(j + 0.5) * step / width, (i + 0.5) * step / height, size / width, size / height])
        return torch.tensor(rows, dtype=torch.float32)

    @torch.no_grad()
    def detect(self, bgr: np.ndarray, threshold: float = DETECTION_SCORE, nms: float = 0.4) -> np.ndarray:
        """[k, 15] rows (x1, y1, x2, y2, score, 5 landmark x/y pairs) in pixels, highest score first."""
        import torchvision

        device = next(self.parameters()).device
        h, w = bgr.shape[:2]
        x = torch.from_numpy(np.ascontiguousarray(bgr.astype(np.float32).transpose(2, 0, 1)))[None].to(device)
        x = x - torch.tensor([104.0, 117.0, 123.0], device=device).view(1, 3, 1, 1)
        loc, conf, landm = (t[0].float().cpu() for t in self(x))
        priors = self.priors(h, w)
        v0, v1 = self.VARIANCE
        centres = priors[:, :2] + loc[:, :2] * v0 * priors[:, 2:]
        sizes = priors[:, 2:] * torch.exp(loc[:, 2:] * v1)
        boxes = torch.cat([centres - sizes / 2, centres + sizes / 2], 1) * torch.tensor([w, h, w, h])
        points = torch.cat([priors[:, :2] + landm[:, 2 * k : 2 * k + 2] * v0 * priors[:, 2:] for k in range(5)], 1)
        points = points * torch.tensor([w, h] * 5, dtype=torch.float32)
        scores = conf[:, 1]
        finite = torch.isfinite(boxes).all(1) & torch.isfinite(points).all(1)  # overflowing exp(): no box
        keep = (scores > threshold) & finite
        boxes, points, scores = boxes[keep], points[keep], scores[keep]
        order = torch.argsort(scores, descending=True, stable=True)
        boxes, points, scores = boxes[order], points[order], scores[order]
        kept = torchvision.ops.nms(boxes, scores, nms)
        return torch.cat([boxes[kept], scores[kept, None], points[kept]], 1).numpy()


def align_faces(bgr: np.ndarray, detections: np.ndarray, size: int = 112) -> list[np.ndarray]:
    """facexlib's ``align_warp_face``: each face's 5 landmarks onto the template, size x size BGR crops."""
    import cv2

    template = FFHQ_TEMPLATE_512 * (size / 512.0)
    crops = []
    for row in detections:
        landmarks = row[5:15].reshape(5, 2).astype(np.float32)  # as facexlib passes them
        matrix = cv2.estimateAffinePartial2D(landmarks, template, method=cv2.LMEDS)[0]
        crops.append(
            cv2.warpAffine(bgr, matrix, (size, size), borderMode=cv2.BORDER_CONSTANT, borderValue=CROP_BORDER_BGR)
        )
    return crops


# --------------------------------------------------------------------------- AdaFace IR-50
class _IRBlock(nn.Module):
    def __init__(self, cin: int, depth: int, stride: int):
        super().__init__()
        if cin == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(cin, depth, 1, stride, bias=False), nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.Conv2d(cin, depth, 3, 1, 1, bias=False),
            nn.BatchNorm2d(depth),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
        )

    def forward(self, x):
        return self.res_layer(x) + self.shortcut_layer(x)


class AdaFaceIR50(nn.Module):
    """AdaFace's ``IR_50`` for 112 px faces: returns the L2-normalised 512-d feature."""

    STAGES = ((64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3))

    def __init__(self):
        super().__init__()
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        blocks = []
        for cin, depth, units in self.STAGES:
            blocks.append(_IRBlock(cin, depth, 2))
            blocks += [_IRBlock(depth, depth, 1) for _ in range(units - 1)]
        self.body = nn.Sequential(*blocks)
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(512),
            nn.Dropout(0.4),
            nn.Flatten(),
            nn.Linear(512 * 7 * 7, 512),
            nn.BatchNorm1d(512, affine=False),
        )

    def forward(self, x):
        return F.normalize(self.output_layer(self.body(self.input_layer(x))), dim=1)

    @staticmethod
    def preprocess(crops_bgr: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(
            ((np.stack(crops_bgr).astype(np.float64) / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2).astype(np.float32)
        )


# --------------------------------------------------------------------------- FaceNet InceptionResnetV1
class _BasicConv(nn.Module):
    def __init__(self, cin, cout, kernel, stride, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001, momentum=0.1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class _Residual(nn.Module):
    """Block35 / Block17 / Block8: parallel branches, a 1x1 conv back to the input width, scaled sum."""

    def __init__(self, width: int, branches: list[nn.Module], mixed: int, scale: float, relu: bool = True):
        super().__init__()
        self.scale = scale
        for k, branch in enumerate(branches):
            setattr(self, f"branch{k}", branch)
        self.count = len(branches)
        self.conv2d = nn.Conv2d(mixed, width, 1)
        self.relu = nn.ReLU() if relu else None

    def forward(self, x):
        out = self.conv2d(torch.cat([getattr(self, f"branch{k}")(x) for k in range(self.count)], 1)) * self.scale + x
        return self.relu(out) if self.relu is not None else out


def _block35(scale):
    return _Residual(
        256,
        [
            _BasicConv(256, 32, 1, 1),
            nn.Sequential(_BasicConv(256, 32, 1, 1), _BasicConv(32, 32, 3, 1, 1)),
            nn.Sequential(_BasicConv(256, 32, 1, 1), _BasicConv(32, 32, 3, 1, 1), _BasicConv(32, 32, 3, 1, 1)),
        ],
        96,
        scale,
    )


def _block17(scale):
    return _Residual(
        896,
        [
            _BasicConv(896, 128, 1, 1),
            nn.Sequential(
                _BasicConv(896, 128, 1, 1),
                _BasicConv(128, 128, (1, 7), 1, (0, 3)),
                _BasicConv(128, 128, (7, 1), 1, (3, 0)),
            ),
        ],
        256,
        scale,
    )


def _block8(scale, relu=True):
    return _Residual(
        1792,
        [
            _BasicConv(1792, 192, 1, 1),
            nn.Sequential(
                _BasicConv(1792, 192, 1, 1),
                _BasicConv(192, 192, (1, 3), 1, (0, 1)),
                _BasicConv(192, 192, (3, 1), 1, (1, 0)),
            ),
        ],
        384,
        scale,
        relu,
    )


class _Concat(nn.Module):
    def __init__(self, *branches):
        super().__init__()
        for k, branch in enumerate(branches):
            setattr(self, f"branch{k}", branch)
        self.count = len(branches)

    def forward(self, x):
        return torch.cat([getattr(self, f"branch{k}")(x) for k in range(self.count)], 1)


class FaceNetInceptionResnetV1(nn.Module):
    """facenet-pytorch's InceptionResnetV1 (embedding mode): the L2-normalised 512-d feature."""

    def __init__(self):
        super().__init__()
        self.conv2d_1a = _BasicConv(3, 32, 3, 2)
        self.conv2d_2a = _BasicConv(32, 32, 3, 1)
        self.conv2d_2b = _BasicConv(32, 64, 3, 1, 1)
        self.maxpool_3a = nn.MaxPool2d(3, 2)
        self.conv2d_3b = _BasicConv(64, 80, 1, 1)
        self.conv2d_4a = _BasicConv(80, 192, 3, 1)
        self.conv2d_4b = _BasicConv(192, 256, 3, 2)
        self.repeat_1 = nn.Sequential(*[_block35(0.17) for _ in range(5)])
        self.mixed_6a = _Concat(
            _BasicConv(256, 384, 3, 2),
            nn.Sequential(_BasicConv(256, 192, 1, 1), _BasicConv(192, 192, 3, 1, 1), _BasicConv(192, 256, 3, 2)),
            nn.MaxPool2d(3, 2),
        )
        self.repeat_2 = nn.Sequential(*[_block17(0.10) for _ in range(10)])
        self.mixed_7a = _Concat(
            nn.Sequential(_BasicConv(896, 256, 1, 1), _BasicConv(256, 384, 3, 2)),
            nn.Sequential(_BasicConv(896, 256, 1, 1), _BasicConv(256, 256, 3, 2)),
            nn.Sequential(_BasicConv(896, 256, 1, 1), _BasicConv(256, 256, 3, 1, 1), _BasicConv(256, 256, 3, 2)),
            nn.MaxPool2d(3, 2),
        )
        self.repeat_3 = nn.Sequential(*[_block8(0.20) for _ in range(5)])
        self.block8 = _block8(1.0, relu=False)
        self.last_linear = nn.Linear(1792, 512, bias=False)
        self.last_bn = nn.BatchNorm1d(512, eps=0.001, momentum=0.1)

    def forward(self, x):
        for name in (
            "conv2d_1a",
            "conv2d_2a",
            "conv2d_2b",
            "maxpool_3a",
            "conv2d_3b",
            "conv2d_4a",
            "conv2d_4b",
            "repeat_1",
            "mixed_6a",
            "repeat_2",
            "mixed_7a",
            "repeat_3",
            "block8",
        ):
            x = getattr(self, name)(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # dropout is inactive at eval
        return F.normalize(self.last_bn(self.last_linear(x)), p=2, dim=1)

    @staticmethod
    def preprocess(crops_bgr: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(crops_bgr).astype(np.float32) / 255.0).permute(0, 3, 1, 2)


# --------------------------------------------------------------------------- the face model
def _load(module: nn.Module, path: Path, what: str, ignore: tuple[str, ...] = ()) -> nn.Module:
    if not path.is_file():
        raise MissingWeights(
            f"{what} weights {path} not found: convert {RELEASES[what]} to safetensors "
            f"and put it there as {WEIGHT_FILES[what]}"
        )
    state = load_safetensors(path)
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith(ignore)}
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        from ..checkpoints.reading import CheckpointError

        raise CheckpointError(
            f"{path.name} does not hold {what} weights (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return module.eval()


class TorchFaceModel:
    """AdaFace or FaceNet embeddings of every facexlib-aligned face of an image (the authors' pipeline)."""

    def __init__(
        self,
        kind: str,
        folder: str | os.PathLike,
        device=None,
        pad_references: bool = True,
        detector: RetinaFaceR50 | None = None,
    ):
        if kind not in ("adaface", "facenet"):
            raise ValueError(f"kind must be 'adaface' or 'facenet', got {kind!r}")
        folder = Path(folder).expanduser()
        self.kind = kind
        self.device = torch.device(
            device if device not in (None, "auto") else ("cuda" if torch.cuda.is_available() else "cpu")
        )
        self.pad_references = pad_references
        self.detector = detector or _load(RetinaFaceR50(), folder / WEIGHT_FILES["retinaface"], "retinaface")
        self.detector.to(self.device)
        net = AdaFaceIR50() if kind == "adaface" else FaceNetInceptionResnetV1()
        self.net = _load(net, folder / WEIGHT_FILES[kind], kind, ignore=("logits.",)).to(self.device)

    def _detections(self, image: np.ndarray, padded: bool) -> tuple[np.ndarray, np.ndarray]:
        """(BGR image, detections), shared by the AdaFace and FaceNet models of one run (same detector)."""
        cache = self.detector.__dict__.setdefault("_recent", [])  # [(source array, padded, bgr, detections)]
        for source, was_padded, bgr, found in cache:
            if source is image and was_padded == padded:
                return bgr, found
        rgb = pad_reference(image) if padded else to_rgb_uint8(image)
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        found = self.detector.detect(bgr)
        cache.append((image, padded, bgr, found))  # holding the array keeps its id from being reused
        del cache[:-8]
        return bgr, found

    @torch.no_grad()
    def _embed(self, image: np.ndarray, padded: bool = False, first_only: bool = False) -> np.ndarray:
        bgr, detections = self._detections(image, padded)
        if first_only:
            detections = detections[:1]
        if not len(detections):
            return np.zeros((0, 512))
        batch = self.net.preprocess(align_faces(bgr, detections)).to(self.device)
        return self.net(batch).double().cpu().numpy()

    def faces(self, image: np.ndarray) -> np.ndarray:
        return self._embed(image)

    def reference(self, image: np.ndarray) -> np.ndarray | None:
        embedded = self._embed(image, padded=self.pad_references, first_only=True)
        return embedded[0] if len(embedded) else None
