"""Losses: flow matching, the ID loss (GT-aligned or detected) and the ID-contrastive loss (InfoNCE, Eq. 7).

Conventions: t in [0, 1] with t = 1 pure noise; ``x_t = (1 - t) * x_0 + t * noise`` and the
model predicts the velocity ``noise - x_0`` (FLUX's rectified flow), so the predicted
clean latent is ``x_t - t * v``. Pixels are float RGB in [0, 1] (see train/models.py).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F

from withanyone_core.recipe import flux_mu, shifted_schedule, time_shift

TRAIN_SCHEDULE_STEPS = 1000  # the authors' get_schedule(999, ...): 1000 shifted values from 1 to 0


def sample_timesteps(
    batch: int, image_tokens: int, generator: torch.Generator, mode: str = "shifted_uniform"
) -> torch.Tensor:
    """Training timesteps t (1 = pure noise).

    ``shifted_uniform`` (the authors' train.py): a uniform index into the 1000 values of
    ``linspace(1, 0, 1000)`` shifted with mu for the image's token count.
    ``logit_normal``: sigmoid of a standard normal, then the same shift (SD3-style).
    """
    mu = flux_mu(image_tokens)
    if mode == "shifted_uniform":
        schedule = shifted_schedule(TRAIN_SCHEDULE_STEPS - 1, mu, torch.float64)
        return schedule[torch.randint(TRAIN_SCHEDULE_STEPS, (batch,), generator=generator)].float()
    if mode == "logit_normal":
        return time_shift(mu, torch.sigmoid(torch.randn(batch, generator=generator)))
    raise ValueError(f"unknown timestep sampling {mode!r}: use shifted_uniform or logit_normal")


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


def contrastive_loss(
    anchors: torch.Tensor,
    valid: torch.Tensor,
    positives: torch.Tensor,
    identity_ids: torch.Tensor,
    negatives: torch.Tensor,
    temperature: float = 0.1,
    batch_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE (Eq. 7): each generated face (anchor) against its positive.

    ``anchors``/``positives`` ``[M, D]`` (generated faces; GT or reference embeddings),
    ``valid`` [M] marks anchors that count (passed the gate, face found and whole).
    Negatives: the extended pool, ``[K, D]`` shared or ``[M, K, D]`` per anchor (the
    authors': K embeddings of identities other than the anchor's), plus the batch:

    - ``batch_keys`` given (``[M, D]``, the batch's GT embeddings; the authors' choice): the
      other rows of this process's batch, except rows of the anchor's own identity;
    - ``batch_keys`` None: the generated faces of other identities in the whole batch,
      gathered across ranks *with* gradients. Rows are padded to the same M on every rank
      so every rank joins the collectives even when none of its samples passed the gate.
    """
    per_anchor = negatives.ndim == 3
    if batch_keys is None:
        padded = _common_rows(anchors, valid, positives, identity_ids, *((negatives,) if per_anchor else ()))
        anchors, valid, positives, identity_ids = padded[:4]
        if per_anchor:
            negatives = padded[4]
    anchors = F.normalize(anchors.float(), dim=-1)
    positives = F.normalize(positives.float(), dim=-1)
    if batch_keys is None:
        keys = gather_with_grad(anchors)
        keys_valid = gather_with_grad(valid.float()).bool()
        keys_ids = gather_with_grad(identity_ids.float()).long()
        keep_graph = 0.0 * keys.sum()  # ties this rank's loss to the gathered tensor: its backward collective runs
    else:
        keys = F.normalize(batch_keys.float(), dim=-1)
        keys_valid = torch.ones(keys.shape[0], dtype=torch.bool, device=keys.device)
        keys_ids = identity_ids
        keep_graph = 0.0 * anchors.sum()
    if not bool(valid.any()):
        return keep_graph
    a, p, ids = anchors[valid], positives[valid], identity_ids[valid]
    pos_logit = (a * p).sum(-1, keepdim=True)
    batch_logits = a @ keys.T
    excluded = (ids[:, None] == keys_ids[None, :]) | ~keys_valid[None, :]
    batch_logits = batch_logits.masked_fill(excluded, float("-inf"))
    pool = F.normalize(negatives.float().to(a.device), dim=-1)
    pool_logits = torch.einsum("ad,akd->ak", a, pool[valid]) if per_anchor else a @ pool.T
    logits = torch.cat([pos_logit, batch_logits, pool_logits], dim=1) / temperature
    target = torch.zeros(a.shape[0], dtype=torch.long, device=a.device)
    return F.cross_entropy(logits, target) + keep_graph


# ------------------------------------------------------------------ detected faces (not GT-aligned)
def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` [n, 4] with every box in ``b`` [m, 4]."""
    a, b = np.asarray(a, dtype=np.float64)[:, None, :4], np.asarray(b, dtype=np.float64)[None, :, :4]
    w = (np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])).clip(min=0)
    h = (np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])).clip(min=0)
    inter = w * h
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    return inter / np.maximum(area(a) + area(b) - inter, 1e-9)


def match_detections(gt_boxes: np.ndarray, detected_boxes: np.ndarray) -> list[int] | None:
    """For each GT box, the index of its detected face (total IoU maximal), or None.

    The authors' non-GT-aligned ID loss needs exactly as many detected faces as persons
    (otherwise the sample leaves the ID losses) and orders them by IoU with the GT boxes.
    """
    n = len(gt_boxes)
    if len(detected_boxes) != n or n == 0:
        return None
    iou = box_iou(gt_boxes, detected_boxes)
    best = max(itertools.permutations(range(n)), key=lambda perm: sum(iou[i, j] for i, j in enumerate(perm)))
    return list(best)


def detected_landmarks(images: torch.Tensor, gt_boxes: torch.Tensor, detector) -> tuple[torch.Tensor, torch.Tensor]:
    """Landmarks of the faces a detector finds on each image, in the GT boxes' order.

    images ``[B, 3, H, W]`` in [0, 1] (no gradient needed); ``gt_boxes`` ``[B, n, 4]``;
    ``detector.detect(uint8 RGB) -> faces with .bbox, .kps``. Returns landmarks ``[B, n, 5, 2]``
    and ``found`` [B] (False: the face count differed, the sample leaves the ID losses).
    """
    b, n = gt_boxes.shape[:2]
    landmarks = torch.zeros(b, n, 5, 2)
    found = torch.zeros(b, dtype=torch.bool)
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i in range(b):
        faces = detector.detect(np.ascontiguousarray(pixels[i]))
        order = match_detections(gt_boxes[i].cpu().numpy(), np.array([f.bbox[:4] for f in faces]).reshape(-1, 4))
        if order is not None:
            landmarks[i] = torch.as_tensor(np.stack([faces[j].kps for j in order]), dtype=torch.float32)
            found[i] = True
    return landmarks, found
