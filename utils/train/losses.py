"""The release's training loss: SoftIoU on the target logits plus a weighted reconstruction MSE."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_iou_loss(logits: torch.Tensor, mask: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - mean over the batch of (sum(p*m) + 1) / (sum(p) + sum(m) - sum(p*m) + 1), p = sigmoid(logits).

    logits, mask: (N, 1, H, W); sums run over each image.
    """
    p = torch.sigmoid(logits.float())
    m = mask.float()
    dims = tuple(range(1, p.dim()))
    intersection = (p * m).sum(dim=dims)
    union = p.sum(dim=dims) + m.sum(dim=dims) - intersection
    return 1.0 - ((intersection + smooth) / (union + smooth)).mean()


def dconet_loss(D: torch.Tensor, T: torch.Tensor, image: torch.Tensor, mask: torch.Tensor,
                mse_weight: float = 0.1, bce_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """loss = SoftIoU(T, mask) + mse_weight * MSE(D, image) [+ bce_weight * BCE(T, mask)]. Returns (loss, its
    parts "loss", "soft_iou", "mse" [, "bce", unweighted, when bce_weight is not 0] as detached 0-d tensors on the
    loss's device: reading them waits for the device, so the training loop reads them only now and then).

    BCE is binary cross-entropy with logits, averaged over the pixels; it is left out at bce_weight 0 (the
    release's loss). Unlike SoftIoU's, its gradient does not vanish where sigmoid(T) saturates: a frame whose
    logits all lie far on the wrong side still receives a pull back."""
    iou = soft_iou_loss(T, mask)
    mse = F.mse_loss(D.float(), image.float())
    loss = iou + mse_weight * mse
    parts = {"soft_iou": iou.detach(), "mse": mse.detach()}
    if bce_weight:
        bce = F.binary_cross_entropy_with_logits(T.float(), mask.float())
        loss = loss + bce_weight * bce
        parts["bce"] = bce.detach()
    return loss, {"loss": loss.detach(), **parts}
