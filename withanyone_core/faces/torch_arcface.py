"""A differentiable ArcFace for training losses, from the same antelopev2 ONNX file.

``TorchArcFace.from_onnx("glintr100.onnx")`` converts the recognizer with onnx2torch.
Pixel convention (the only one the trainer uses): ``forward`` takes aligned RGB crops,
float in [0, 1], ``[B, 3, 112, 112]``; the module applies insightface's normalisation
(x * 255 - 127.5) / 127.5 itself, so its embedding equals onnxruntime's on the same
crop. :func:`align_faces` is the differentiable counterpart of insightface's
``norm_crop``: the same similarity transform, applied with ``grid_sample``.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ARCFACE_TEMPLATE = torch.tensor(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=torch.float32,
)


class TorchArcFace(nn.Module):
    def __init__(self, network: nn.Module, input_mean: float = 127.5, input_std: float = 127.5):
        super().__init__()
        self.network = network
        self.input_mean = input_mean
        self.input_std = input_std

    @classmethod
    def from_onnx(cls, path: str | os.PathLike) -> TorchArcFace:
        import onnx
        from onnx2torch import convert

        model = onnx.load(str(path))
        # mxnet-era exports normalise inside the graph (insightface checks the same way)
        names = [n.name for n in model.graph.node[:8]]
        inside = any(n.startswith(("Sub", "_minus")) for n in names) and any(
            n.startswith(("Mul", "_mul")) for n in names
        )
        return cls(convert(model), *((0.0, 1.0) if inside else (127.5, 127.5)))

    def forward(self, aligned: torch.Tensor) -> torch.Tensor:
        """aligned RGB crops in [0, 1] ``[B, 3, 112, 112]`` -> raw embeddings ``[B, 512]``."""
        x = (aligned * 255.0 - self.input_mean) / self.input_std
        return self.network(x)


def similarity_transform(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity (Umeyama) mapping src [B, 5, 2] onto dst [5, 2] -> [B, 2, 3]."""
    dst = dst.to(src)
    src_mean, dst_mean = src.mean(dim=1, keepdim=True), dst.mean(dim=0, keepdim=True)
    s, d = src - src_mean, (dst - dst_mean).expand_as(src)
    var = (s**2).sum(dim=(1, 2)) / src.shape[1]
    cov = torch.einsum("bni,bnj->bij", d, s) / src.shape[1]
    u, sigma, vh = torch.linalg.svd(cov)
    sign = torch.ones(src.shape[0], 2, device=src.device, dtype=src.dtype)
    sign[:, 1] = torch.sign(torch.linalg.det(cov)).where(torch.linalg.det(cov) != 0, torch.ones_like(var))
    rot = u @ torch.diag_embed(sign) @ vh
    scale = (sigma * sign).sum(dim=1) / var
    trans = dst_mean.squeeze(1) - scale[:, None] * torch.einsum("bij,bj->bi", rot, src_mean.squeeze(1))
    return torch.cat([scale[:, None, None] * rot, trans[:, :, None]], dim=2)


def align_faces(images: torch.Tensor, landmarks: torch.Tensor, size: int = 112) -> torch.Tensor:
    """Differentiable ArcFace alignment: images [B, 3, H, W], landmarks [B, 5, 2] px -> [B, 3, size, size].

    Bilinear sampling with zeros outside the image, like ``cv2.warpAffine`` in ``norm_crop``.
    """
    b, _, h, w = images.shape
    template = ARCFACE_TEMPLATE * (size / 112.0)
    m = similarity_transform(landmarks.float(), template)  # crop <- image
    # invert: for every crop pixel, where in the image to sample
    a, t = m[:, :, :2], m[:, :, 2:]
    a_inv = torch.linalg.inv(a)
    t_inv = -a_inv @ t
    ys, xs = torch.meshgrid(
        torch.arange(size, dtype=images.dtype, device=images.device),
        torch.arange(size, dtype=images.dtype, device=images.device),
        indexing="ij",
    )
    crop_pts = torch.stack([xs, ys], dim=-1).reshape(1, -1, 2)
    img_pts = torch.einsum("bij,bnj->bni", a_inv.to(images.dtype), crop_pts.expand(b, -1, -1)) + t_inv.to(
        images.dtype
    ).transpose(1, 2)
    grid = torch.stack([(img_pts[..., 0] + 0.5) / w * 2 - 1, (img_pts[..., 1] + 0.5) / h * 2 - 1], dim=-1)
    return F.grid_sample(
        images, grid.reshape(b, size, size, 2), mode="bilinear", padding_mode="zeros", align_corners=False
    )


def numpy_crop_to_tensor(crop: np.ndarray) -> torch.Tensor:
    """An RGB uint8 ``112x112x3`` crop -> ``[1, 3, 112, 112]`` in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None].float() / 255.0
