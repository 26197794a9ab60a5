"""A packed residual stream for BERT-family encoders: the per-token INT8 graph traced with
real tokens only from the embeddings to the pooling, against the exporter's graph.

    python benchmarks/packed_stream.py --bundle BUNDLE --model MODEL_DIR [--rounds 5] [--out F]

BUNDLE holds the int8-dynamic artifact exported from MODEL_DIR (mean pooling). The packed
graph gathers the real tokens' rows after the embeddings (NonZero of the flattened mask) and
keeps the stream as [N, H] rows: every linear layer, bias, residual, LayerNorm and GELU
runs on N rows; only Q, K and V are gathered back to [B, T] for attention and the context
gathered to rows again; the states go back to [B, T] for the project's own pooling (its
running-sum mean). It is traced from the same torch modules, rewritten per token by the
exporter's own quantize_dynamic_int8 with the artifact's float-kept layers (matched by weight
name), and checked: equal bits for a text alone and in random batches (batch invariance),
and its min cosine to the artifact on the timed sentences. Timing as benchmarks/pad_free.py:
one ONNX Runtime thread, STS-B test, sorted / served-shape / unsplit batches, rounds
interleaved, medians (and the median of the per-round ratios).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from angle_torch.model import AngleModel
from benchmarks.pad_free import (
    MASK,
    feed,
    paired,
    parser,
    prepared,
    session,
    shapes,
    stamp,
    timed_rounds,
    write,
)
from exporters.quantize import linear_layers, quantize_dynamic_int8

ROOT = Path(__file__).resolve().parent.parent


class PackedEncoder(nn.Module):
    """AngleModel's BERT-family backbone + pooling + L2 normalize, on real tokens' rows."""

    def __init__(self, angle: AngleModel) -> None:
        super().__init__()
        self.angle = angle
        self.backbone = angle.backbone

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        b, t = input_ids.shape
        flat = attention_mask.reshape(-1)
        rows = torch.nonzero(flat).reshape(-1)
        back = torch.where(flat > 0, torch.cumsum(flat, 0) - 1, torch.zeros_like(flat))
        emb = self.backbone.embeddings(input_ids=input_ids)
        width = emb.shape[-1]
        h = emb.reshape(-1, width)[rows]
        bias = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        for layer in self.backbone.encoder.layer:
            sa = layer.attention.self
            shape = (b, t, sa.num_attention_heads, sa.attention_head_size)
            q, k, v = (m(h)[back].reshape(shape).transpose(1, 2)
                       for m in (sa.query, sa.key, sa.value))
            p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * sa.scaling + bias, dim=-1)
            ctx = torch.matmul(p, v).transpose(1, 2).reshape(-1, width)[rows]
            h = layer.attention.output.LayerNorm(layer.attention.output.dense(ctx) + h)
            h = layer.output.LayerNorm(layer.output.dense(layer.intermediate(h)) + h)
        pooled = self.angle.pool(h[back].reshape(b, t, width), attention_mask)
        return nn.functional.normalize(pooled, p=2.0, dim=-1)


def weight_path(name: str) -> str:
    """'…encoder.layer.5.attention.self.value.weight' → 'encoder/layer.5/attention/self/value'."""
    path = name.rsplit(".", 1)[0]
    path = path[path.index("encoder."):] if "encoder." in path else path
    return re.sub(r"\.(?!\d)", "/", path)


def kept_in_float(artifact: Path) -> set[str]:
    """Weight paths of the artifact's linear layers that were not quantized."""
    model = onnx.load(str(artifact), load_external_data=False)
    # '/model/backbone/encoder/layer.5/attention/self/value/MatMul' → as weight_path's
    return {weight_path(layer.node.strip("/").replace("/", ".")) for layer in linear_layers(model)}


def packed_int8(angle: AngleModel, keep: set[str], tmp: Path) -> Path:
    """Trace the packed graph, name each Gemm after its weight, quantize per token."""
    ids, mask = angle.pad([[101, 2000, 2001, 2002, 102], [101, 2000, 102]])
    src, dst = tmp / "packed.onnx", tmp / "packed.int8-dynamic.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(PackedEncoder(angle).eval(), (ids, mask), str(src),
                          input_names=["input_ids", MASK], output_names=["embedding"],
                          opset_version=17, dynamo=False, dynamic_axes={
                              "input_ids": {0: "b", 1: "s"}, MASK: {0: "b", 1: "s"},
                              "embedding": {0: "b"}})
    model = onnx.load(str(src))
    for node in model.graph.node:
        if node.op_type == "Gemm":
            node.name = f"/{weight_path(node.input[1])}/Gemm"
    onnx.save(model, str(src))
    exclude = [f"^/{re.escape(k)}/Gemm$" for k in keep]
    return quantize_dynamic_int8(src, dst, exclude)


def run(args: argparse.Namespace) -> dict:
    enc, ids, lengths, artifact = prepared(args)
    keep = kept_in_float(artifact)
    angle = AngleModel.from_pretrained(str(args.model), pooling=enc.manifest.pooling,
                                       attn_implementation="eager").eval()
    with tempfile.TemporaryDirectory() as tmp:
        graphs = {"per-token": session(artifact),
                  "packed": session(packed_int8(angle, keep, Path(tmp)))}
    alone = np.concatenate([graphs["packed"].run(None, feed(ids, np.array([i])))[0]
                            for i in range(len(ids))])
    base = np.concatenate([graphs["per-token"].run(None, feed(ids, np.array([i])))[0]
                           for i in range(len(ids))])
    rng = np.random.default_rng(2)
    for _ in range(30):
        batch = rng.choice(len(ids), int(rng.integers(2, 48)), replace=False)
        if not np.array_equal(graphs["packed"].run(None, feed(ids, batch))[0], alone[batch]):
            raise SystemExit("the packed graph is not batch-invariant")
    min_cos = float((alone * base).sum(1).min())
    print(f"packed: batch-invariant (30 batches), min cosine to the artifact {min_cos:.7f}")
    feeds = {k: [feed(ids, b) for b in v]
             for k, v in shapes(lengths, enc.max_batch_tokens).items()}
    rows = []
    for shape, per_graph in timed_rounds(graphs, feeds, args.rounds, len(ids)).items():
        ratio = paired(per_graph["packed"], per_graph["per-token"])
        row = {"shape": shape, **{f"{g}_sent_per_s": statistics.median(v)
                                  for g, v in per_graph.items()},
               "packed_over_per_token": ratio, "rounds": per_graph}
        rows.append(row)
        print(f"{shape:17s} per-token {row['per-token_sent_per_s']:5.0f}, packed "
              f"{row['packed_sent_per_s']:5.0f} sent/s (median ratio a round {ratio:.2f})",
              flush=True)
    return {"bundle": str(args.bundle), "kept_in_float": sorted(keep), "sentences": len(ids),
            "batch_invariant": True, "min_cosine_to_artifact": min_cos, "rows": rows,
            **stamp()}


def main() -> None:
    p = parser(__doc__, "packed-stream")
    p.add_argument("--model", type=Path, required=True)
    args = p.parse_args()
    write(args.out, run(args))


if __name__ == "__main__":
    main()
