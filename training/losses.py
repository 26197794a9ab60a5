"""AnglE losses (angle_emb 0.6.1 semantics). Embeddings arrive zig-zag: pair i is rows
(2i, 2i+1) for format A; a triple is rows (3i, 3i+1, 3i+2) for format B."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NEG_INF = 1e12  # what angle_emb subtracts to drop a term from logsumexp / softmax


def _rank_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CoSENT ranking: log(1 + Σ_{y_i < y_j} exp(s_i − s_j)). scores, labels: [N] → scalar."""
    diff = scores[:, None] - scores[None, :]
    keep = (labels[:, None] < labels[None, :]).to(scores.dtype)
    terms = (diff - (1.0 - keep) * NEG_INF).reshape(-1)
    return torch.logsumexp(torch.cat([terms.new_zeros(1), terms]), dim=0)


def cosine_loss(labels: torch.Tensor, emb: torch.Tensor, tau: float = 20.0) -> torch.Tensor:
    """CoSENT on pair cosines. labels: [N] floats; emb: [2N, D] zig-zag → scalar."""
    x = F.normalize(emb, p=2, dim=1)
    scores = (x[0::2] * x[1::2]).sum(dim=1) * tau
    return _rank_loss(scores, labels)


def angle_loss(labels: torch.Tensor, emb: torch.Tensor, tau: float = 1.0,
               pooling: str = "sum") -> torch.Tensor:
    """AnglE's angle term. labels: [N]; emb: [2N, D] zig-zag, D even → scalar.

    With u = a + ib and v = c + id (first and second halves of each vector), the score is
    tau·|Σ_k (a_k c_k + b_k d_k + b_k c_k − a_k d_k)| / (|u||v|), i.e. |cos(u, v) + (b·c −
    a·d)/(|u||v|)| — angle_emb's computation, ranked like CoSENT. `pooling="mean"`
    divides the sum by D.
    """
    if pooling not in ("sum", "mean"):
        raise ValueError(f"angle pooling must be 'sum' or 'mean', got {pooling!r}")
    a, b = torch.chunk(emb[0::2], 2, dim=1)
    c, d = torch.chunk(emb[1::2], 2, dim=1)
    norm_u = (a.pow(2) + b.pow(2)).sum(dim=1).sqrt()
    norm_v = (c.pow(2) + d.pow(2)).sum(dim=1).sqrt()
    total = (a * c + b * d + b * c - a * d).sum(dim=1) / (norm_u * norm_v)
    if pooling == "mean":
        total = total / emb.shape[1]
    return _rank_loss(total.abs() * tau, labels)


def in_batch_negative_loss(labels: torch.Tensor, emb: torch.Tensor,
                           tau: float = 20.0) -> torch.Tensor:
    """In-batch negatives over all 2N rows. labels: [N]; emb: [2N, D] zig-zag → scalar.

    Row r's target is its pair partner when int(label) ≠ 0 (angle_emb casts labels to
    int, so on a 0–5 scale any score ≥ 1 is a positive; training.data refuses negative
    labels, which would count too); rows without a positive add 0 but still count in the
    mean.
    """
    x = F.normalize(emb, p=2, dim=1)
    n = x.shape[0]
    sim = (x @ x.T - torch.eye(n, device=x.device, dtype=x.dtype) * NEG_INF) * tau
    partner = torch.arange(n, device=x.device) ^ 1
    positive = labels.repeat_interleave(2).to(torch.int64) != 0
    logp = F.log_softmax(sim, dim=1).gather(1, partner[:, None]).squeeze(1)
    return -(logp * positive.to(logp.dtype)).mean()


def contrastive_loss(query: torch.Tensor, positive: torch.Tensor,
                     negative: torch.Tensor | None = None, tau: float = 20.0) -> torch.Tensor:
    """InfoNCE: query i against every positive (and negative). [B, D] each → scalar."""
    targets = positive if negative is None else torch.cat([positive, negative], dim=0)
    scores = F.normalize(query, dim=1) @ F.normalize(targets, dim=1).T * tau
    return F.cross_entropy(scores, torch.arange(len(query), device=query.device))


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher ‖ student) over each vector's softmax, scaled by T². [B, D] each → scalar.

    At T = 1 this is angle_emb's teacher term (KLDiv, batchmean, over embedding dims).
    """
    t = temperature
    return F.kl_div(F.log_softmax(student / t, dim=-1), F.softmax(teacher / t, dim=-1),
                    reduction="batchmean") * t * t


@dataclass
class AngleLoss:
    """The weighted AnglE objective; defaults are angle_emb 0.6.1's (since v0.4.12)."""

    cosine_w: float = 0.0  # CoSENT on cosines
    ibn_w: float = 1.0  # in-batch negatives (A) / contrastive with positives (B, C)
    cln_w: float = 1.0  # contrastive with the hard negative (B)
    angle_w: float = 0.02  # the angle term
    cosine_tau: float = 20.0
    ibn_tau: float = 20.0
    angle_tau: float = 20.0
    angle_pooling: str = "sum"

    def __call__(self, emb: torch.Tensor, labels: torch.Tensor | None, fmt: str) -> torch.Tensor:
        """emb: zig-zag rows as the collator emits them for `fmt` (A, B or C) → scalar."""
        if fmt == "A":
            return self._pairs(emb, labels)
        if fmt == "C":  # text, positive: only the contrastive term applies
            return self.ibn_w * contrastive_loss(emb[0::2], emb[1::2], tau=self.ibn_tau)
        if fmt == "B":
            return self._triples(emb)
        raise ValueError(f"unknown dataset format {fmt!r}; expected A, B or C")

    def _pairs(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = emb.new_zeros(())
        if self.cosine_w:
            loss = loss + self.cosine_w * cosine_loss(labels, emb, self.cosine_tau)
        if self.ibn_w:
            loss = loss + self.ibn_w * in_batch_negative_loss(labels, emb, self.ibn_tau)
        if self.angle_w:
            loss = loss + self.angle_w * angle_loss(labels, emb, self.angle_tau,
                                                    self.angle_pooling)
        return loss

    def _triples(self, emb: torch.Tensor) -> torch.Tensor:
        q, p, n = emb[0::3], emb[1::3], emb[2::3]
        # the /2 applies whatever the weights (angle_emb)
        loss = (self.ibn_w * contrastive_loss(q, p, tau=self.ibn_tau)
                + self.cln_w * contrastive_loss(q, p, n, tau=self.ibn_tau)) / 2.0
        if self.angle_w or self.cosine_w:
            pairs = torch.cat([torch.stack([q, p], 1), torch.stack([q, n], 1)]).flatten(0, 1)
            labels = torch.cat([q.new_ones(len(q)), q.new_zeros(len(q))])
            if self.angle_w:
                loss = loss + self.angle_w * angle_loss(labels, pairs, self.angle_tau,
                                                        self.angle_pooling)
            if self.cosine_w:
                loss = loss + self.cosine_w * cosine_loss(labels, pairs, self.cosine_tau)
        return loss
