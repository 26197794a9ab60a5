"""AnglE pooling, as angle_emb 0.6.1 defines it (one implementation for training and export).

H is the last hidden state [B, L, D], m the attention mask [B, L].
Deliberate difference: `max` and `cls_max` ignore pad positions. angle_emb multiplies
H by m before the max, so a pad counts as 0 and a sentence's vector depends on how long
its batch neighbours are; ours equals angle_emb's result for the sentence unpadded.
"""

from __future__ import annotations

import torch

STRATEGIES = ("cls", "cls_avg", "cls_max", "mean", "avg", "max", "last")


def check_strategy(strategy: str | int) -> str | int:
    """Return a valid strategy: a name of STRATEGIES or a token index (int or digit string)."""
    if isinstance(strategy, bool):
        raise ValueError(f"pooling strategy must be a name or an int, got {strategy!r}")
    if isinstance(strategy, int):
        return strategy
    if isinstance(strategy, str) and strategy.lstrip("-").isdigit():
        return int(strategy)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown pooling strategy {strategy!r}; choose one of "
                         f"{', '.join(STRATEGIES)} or a token index")
    return strategy


def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ(H·m)/Σm per row: [B, L, D], [B, L] → [B, D].

    The sum is a running sum read at the last position, so its additions run in token order
    whatever the padding and the batch: a pad adds ±0, which leaves a sum unchanged (only an
    exact zero can change sign). A plain sum (ONNX ReduceSum) adds in an order that depends
    on the padded width, so a text's vector moved in its last bits with its longest
    neighbour (ONNX Runtime 1.2x CPU: 3–5e-8 on MiniLM). Summed in float32 at least: a
    half-precision running sum would round at every token, a bf16 count past 256."""
    m = mask.unsqueeze(-1).to(h.dtype)
    acc = torch.promote_types(h.dtype, torch.float32)
    total = (h * m).cumsum(dim=1, dtype=acc)[:, -1]
    return (total / m.sum(dim=1, dtype=acc)).to(h.dtype)


def masked_max(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max over real tokens: [B, L, D], [B, L] → [B, D]."""
    m = mask.unsqueeze(-1).bool()
    return h.masked_fill(~m, torch.finfo(h.dtype).min).max(dim=1).values


def last_token(h: torch.Tensor, mask: torch.Tensor, padding_side: str) -> torch.Tensor:
    """The last real token: position -1 under left padding, Σm−1 under right padding."""
    if padding_side == "left":
        return h[:, -1]
    idx = mask.sum(dim=1) - 1
    return h[torch.arange(h.shape[0], device=h.device), idx]


def token_at(h: torch.Tensor, mask: torch.Tensor, index: int,
             padding_side: str) -> torch.Tensor:
    """Each row's real token `index` (negative: counted from its last real token), wherever
    the padding put the row; an index past a row's tokens takes its nearest end (the
    runtime refuses such texts: angle_rt.manifest.min_tokens). Counted on the padded row,
    -1 under right padding or 0 under left padding would read a pad: a vector that
    changed with the batch's longest text."""
    if padding_side == "right" and index == 0:
        return h[:, 0]
    n = mask.sum(dim=1)
    offset = (n + index if index < 0 else torch.full_like(n, index)).clamp(min=0)
    offset = torch.minimum(offset, n - 1)
    start = h.shape[1] - n if padding_side == "left" else torch.zeros_like(n)
    return h[torch.arange(h.shape[0], device=h.device), start + offset]


def pool(h: torch.Tensor, mask: torch.Tensor, strategy: str | int,
         padding_side: str = "right") -> torch.Tensor:
    """Pool token states [B, L, D] into sentence vectors [B, D]."""
    strategy = check_strategy(strategy)
    if isinstance(strategy, int):
        return token_at(h, mask, strategy, padding_side)
    if strategy == "cls":
        return token_at(h, mask, 0, padding_side)
    if strategy in ("mean", "avg"):
        return masked_mean(h, mask)
    if strategy == "cls_avg":
        return (token_at(h, mask, 0, padding_side) + masked_mean(h, mask)) / 2.0
    if strategy == "max":
        return masked_max(h, mask)
    if strategy == "cls_max":
        return (token_at(h, mask, 0, padding_side) + masked_max(h, mask)) / 2.0
    return last_token(h, mask, padding_side)
