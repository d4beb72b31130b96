"""Losses: flow matching, the GT-aligned ID loss and the ID-contrastive loss (InfoNCE, Eq. 7).

Conventions: t in [0, 1] with t = 1 pure noise; ``x_t = (1 - t) * x_0 + t * noise`` and the
model predicts the velocity ``noise - x_0`` (FLUX's rectified flow), so the predicted
clean latent is ``x_t - t * v``. Pixels are float RGB in [0, 1] (see train/models.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def shift_mu(image_tokens: int, base_tokens: int = 256, max_tokens: int = 4096,
             base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift: linear in the number of image tokens."""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return base_shift + slope * (image_tokens - base_tokens)


def sample_timesteps(batch: int, image_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """The reference's training schedule: logit-normal t, then FLUX's time shift for the size."""
    t = torch.sigmoid(torch.randn(batch, generator=generator))
    mu = shift_mu(image_tokens)
    return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))


def flow_matching_loss(velocity: torch.Tensor, noise: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(velocity.float(), (noise - clean).float())


def predicted_clean(noisy: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return noisy - t.view(-1, *([1] * (noisy.dim() - 1))) * velocity


def id_gate(t: torch.Tensor, gate: float) -> torch.Tensor:
    """Samples whose noise level is low enough for a meaningful face: t <= gate."""
    return t <= gate


def face_embeddings(images: torch.Tensor, landmarks: torch.Tensor, arcface: torch.nn.Module) -> torch.Tensor:
    """Embed every person's face of each image, aligned with the given landmarks.

    images ``[B, 3, H, W]`` in [0, 1]; landmarks ``[B, n, 5, 2]`` pixels -> ``[B, n, 512]``.
    """
    from withanyone_core.faces.torch_arcface import align_faces

    b, n = landmarks.shape[:2]
    crops = align_faces(images.repeat_interleave(n, dim=0), landmarks.reshape(b * n, 5, 2))
    return arcface(crops).reshape(b, n, -1)


def id_loss(generated: torch.Tensor, ground_truth: torch.Tensor) -> torch.Tensor:
    """GT-aligned ID loss: mean of 1 - cos(generated face, ground-truth face) over persons."""
    return (1.0 - F.cosine_similarity(generated.float(), ground_truth.float(), dim=-1)).mean()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather across ranks keeping the autograd graph (a plain all_gather drops it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def _common_rows(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Pad row counts to the largest on any rank (batches may hold different person counts)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    rows = torch.tensor([tensors[0].shape[0]], device=tensors[0].device)
    dist.all_reduce(rows, op=dist.ReduceOp.MAX)
    extra = int(rows.item()) - tensors[0].shape[0]
    if extra == 0:
        return tensors
    return tuple(torch.cat([t, t.new_zeros(extra, *t.shape[1:])]) for t in tensors)


def contrastive_loss(anchors: torch.Tensor, valid: torch.Tensor, positives: torch.Tensor, identity_ids: torch.Tensor,
                     negatives: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """InfoNCE (Eq. 7): each generated face (anchor) against its reference face (positive).

    Negatives: the extended pool (``negatives`` [K, D], sampled once per batch without the
    batch's identities) and the generated faces of other identities in the whole batch,
    gathered across ranks *with* gradients. ``anchors``/``positives`` ``[M, D]`` are padded
    to the same M on every rank, ``valid`` [M] marks real rows, so every rank joins the
    collectives even when none of its samples passed the timestep gate.
    """
    anchors, valid, positives, identity_ids = _common_rows(anchors, valid, positives, identity_ids)
    anchors = F.normalize(anchors.float(), dim=-1)
    positives = F.normalize(positives.float(), dim=-1)
    all_anchors = gather_with_grad(anchors)
    all_valid = gather_with_grad(valid.float()).bool()
    all_ids = gather_with_grad(identity_ids.float()).long()
    # ties this rank's loss to the gathered tensor so its backward collective always runs
    keep_graph = 0.0 * all_anchors.sum()
    if not bool(valid.any()):
        return keep_graph
    a, p, ids = anchors[valid], positives[valid], identity_ids[valid]
    pos_logit = (a * p).sum(-1, keepdim=True)
    batch_logits = a @ all_anchors.T
    excluded = (ids[:, None] == all_ids[None, :]) | ~all_valid[None, :]
    batch_logits = batch_logits.masked_fill(excluded, float("-inf"))
    pool_logits = a @ F.normalize(negatives.float().to(a.device), dim=-1).T
    logits = torch.cat([pos_logit, batch_logits, pool_logits], dim=1) / temperature
    target = torch.zeros(a.shape[0], dtype=torch.long, device=a.device)
    return F.cross_entropy(logits, target) + keep_graph
