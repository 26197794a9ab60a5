"""Trace backbone + pooler (+ L2 normalize) into one ONNX graph: ids in, sentence vector out."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from angle_rt.manifest import INPUT_NAMES, OUTPUT_NAME
from angle_torch.model import AngleModel

MIN_OPSET = 17  # LayerNormalization is one op from 17 (TensorRT maps it to its norm layer)
DEFAULT_OPSET = 17


class ExportModule(nn.Module):
    """What the graph computes; keyword inputs keep transformers 5 happy under tracing."""

    def __init__(self, model: AngleModel, normalize: bool) -> None:
        super().__init__()
        self.model = model
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        emb = self.model(input_ids=input_ids, attention_mask=attention_mask).float()
        if self.normalize:
            emb = nn.functional.normalize(emb, p=2.0, dim=-1)
        return emb


def trace_inputs(model: AngleModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of different lengths, so masking code is traced with padding present."""
    special = model.tokenizer.encode(["a"])[0]
    vocab = model.hf_tokenizer.vocab_size
    gen = torch.Generator().manual_seed(0)
    body = torch.randint(min(1000, vocab // 2), vocab, (11,), generator=gen).tolist()
    rows = [special[:1] + body + special[-1:], special[:1] + body[:4] + special[-1:]]
    return model.pad(rows)


def check_opset(opset: int) -> None:
    """MIN_OPSET up to the newest torch.onnx writes (past it torch raised with the whole
    traced graph in its message)."""
    from torch.onnx._constants import ONNX_MAX_OPSET

    if not MIN_OPSET <= opset <= ONNX_MAX_OPSET:
        raise ValueError(f"opset must be {MIN_OPSET}…{ONNX_MAX_OPSET} (≥ {MIN_OPSET}: one "
                         f"LayerNormalization op; ≤ {ONNX_MAX_OPSET}: torch.onnx's newest), "
                         f"got {opset}")


def export_onnx(model: AngleModel, path: str | Path, *, normalize: bool,
                opset: int = DEFAULT_OPSET) -> Path:
    """Write the fp32 graph to `path` (dynamic batch and sequence axes)."""
    check_opset(opset)
    module = ExportModule(model.eval(), normalize).eval()
    ids, mask = trace_inputs(model)
    axes = {**{name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES},
            OUTPUT_NAME: {0: "batch"}}
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about Python bools in HF mask code; the parity gate checks the
        # graph at many other shapes, which is what those warnings are about.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (ids, mask), str(path), input_names=list(INPUT_NAMES),
                          output_names=[OUTPUT_NAME], dynamic_axes=axes, opset_version=opset,
                          do_constant_folding=True, dynamo=False)
    return Path(path)
