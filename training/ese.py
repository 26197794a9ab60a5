"""Espresso (ESE, angle_emb 0.6.1's `AngleESETrainer`) and Matryoshka dimension losses: train
one model whose shallower layers and leading dimensions are good embeddings themselves.

ESE, with k = `compression` and T = `kl_temperature`, over hidden states h_0 (embedding
output) … h_n (last layer), each pooled like the model:
- last layer:  L(h_n) + L(h_n[:, :k]) + distill(h_n[:, :k], PCA_k(h_n))
- layers:      1/(n−1) · Σ_i [L(h_i[:, :k]) + distill(h_i[:, :k], PCA_k(h_i))] / (1 + ln(1+i))
where L is the AnglE objective, distill(x, y) = MSE(x, y) + T·KL(softmax(y/T) ‖ softmax(x/T))
and PCA_k(m) = m·U·diag(S), U, S the top-k of svd_lowrank(softmax(mᵀm/√D)) under no_grad.

angle_emb sums over i = 0 … n−2: the embedding output h_0 gets the largest weight and the
second-to-last layer h_{n−1} none. That is kept as `layers="angle_emb"` (the default, so
angle_emb-trained and angle_rt-trained ESE models match); `layers="transformer"` uses the
transformer layers h_1 … h_{n−1} instead (every depth a layer cut can produce, no
embedding-only term), weighted by their depth the same way (docs/training.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LAYER_CHOICES = ("angle_emb", "transformer")


@torch.no_grad()
def pca_compress(m: torch.Tensor, k: int) -> torch.Tensor:
    """angle_emb's PCA target: [B, D] → [B, k], no gradient (randomized low-rank SVD of the
    softmax-normalized feature Gram matrix)."""
    a = F.softmax(m.T @ m / m.shape[-1] ** 0.5, dim=-1)
    u, s, _ = torch.svd_lowrank(a, q=k)
    return m @ (u @ torch.diag(s))


def distill(x: torch.Tensor, y: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """MSE(x, y) + T·KL(softmax(y/T) ‖ softmax(x/T)) (batchmean), angle_emb's
    `compute_distillation_loss` with mse_weight 1: the KL is scaled by T, not T²."""
    loss = F.mse_loss(x, y)
    if temperature > 0:
        loss = loss + F.kl_div(F.log_softmax(x / temperature, dim=-1),
                               F.softmax(y / temperature, dim=-1),
                               reduction="batchmean") * temperature
    return loss


@dataclass
class EseLoss:
    """The ESE terms on a model's hidden states; `loss` is the AnglE objective on vectors."""

    compression: int = 128  # k: the leading dimensions every layer is trained to fill
    kl_temperature: float = 1.0
    pca: bool = True  # distill the k leading dims towards PCA_k (angle_emb's apply_ese_pca)
    layers: str = "angle_emb"  # which hidden states get layer terms: see the module doc
    layer_weight: float = 1.0  # × the layer terms; 1 is angle_emb's weighting

    def __post_init__(self) -> None:
        if self.layers not in LAYER_CHOICES:
            raise ValueError(f"ESE layers must be one of {LAYER_CHOICES}, got {self.layers!r}")
        if self.compression < 1:
            raise ValueError(f"ESE compression size must be ≥ 1, got {self.compression}")
        if self.layer_weight < 0:
            raise ValueError(f"ESE layer weight must be ≥ 0, got {self.layer_weight}")

    def __call__(self, hidden: Sequence[torch.Tensor],
                 pool: Callable[[torch.Tensor], torch.Tensor],
                 loss: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """`hidden`: h_0 … h_n as the backbone returns them (output_hidden_states);
        `pool`: token states → vectors; `loss`: vectors → the AnglE objective."""
        n = len(hidden) - 1
        full = pool(hidden[-1]).float()
        total = loss(full) + self._compressed(full, loss)
        indices = range(n - 1) if self.layers == "angle_emb" else range(1, n)
        students = full.new_zeros(())
        for i in indices:
            weight = 1.0 + math.log(1 + i)
            students = students + self._compressed(pool(hidden[i]).float(), loss) / weight
        return total + self.layer_weight * students / max(n - 1, 1)

    def _compressed(self, vectors: torch.Tensor, loss: Callable) -> torch.Tensor:
        k = min(self.compression, vectors.shape[-1])
        slim = vectors[:, :k]
        out = loss(slim)
        if self.pca:
            out = out + distill(slim, pca_compress(vectors, k), self.kl_temperature)
        return out


def matryoshka_loss(vectors: torch.Tensor, dims: Sequence[int],
                    loss: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Σ_d loss(vectors[:, :d]) over `dims` below the full width (the full width is the main
    loss already): each leading slice is trained as an embedding of its own."""
    width = vectors.shape[-1]
    total = vectors.new_zeros(())
    for d in dims:
        if not 0 < d <= width:
            raise ValueError(f"Matryoshka dim {d} is outside 1..{width}")
        if d < width:
            total = total + loss(vectors[:, :d])
    return total
