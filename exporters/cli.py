"""`angle-export`: a thin argparse shim over `exporters.export`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from angle_rt.errors import AngleRTError, ParityError
from exporters.onnx_export import DEFAULT_OPSET


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="angle-export",
        description="Export an AnglE / sentence-embedding model to an angle_rt bundle "
                    "(ONNX graph with pooling inside + tokenizer + manifest), verified "
                    "against PyTorch.")
    p.add_argument("--model", required=True, help="hub id or local model directory")
    p.add_argument("-o", "--output", help="bundle directory (default: build/<model name>)")
    p.add_argument("--pooling", help="cls, cls_avg, cls_max, mean, avg, max, last or a token "
                                     "index (default: what the model was saved with)")
    p.add_argument("--max-length", type=int, help="tokens per text, prompt included")
    p.add_argument("--prompt", help="default prompt: A, B, C, a saved name, or a template "
                                    "with {text}")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="L2-normalize inside the graph (default: as the model was trained)")
    p.add_argument("--padding-side", choices=("right", "left"))
    p.add_argument("--lora", help="peft LoRA adapter directory, merged before export")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    p.add_argument("--verify-data", help=".txt (one text per line) or .jsonl texts for the "
                                         "parity gate (default: the built-in set)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the parity gate")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="angle-export: %(message)s")
    from exporters.pipeline import export  # torch import after argument errors

    out = args.output or str(Path("build") / Path(args.model.rstrip("/")).name)
    try:
        bundle = export(args.model, out, pooling=args.pooling, max_length=args.max_length,
                        prompt=args.prompt, normalize=args.normalize,
                        padding_side=args.padding_side, lora=args.lora,
                        revision=args.revision, opset=args.opset, force=args.force,
                        verify=args.verify, verify_data=args.verify_data,
                        trust_remote_code=args.trust_remote_code, progress=not args.quiet)
    except ParityError as exc:
        print(f"angle-export: parity gate failed, nothing written:\n{exc}", file=sys.stderr)
        return 1
    except (AngleRTError, OSError, ValueError) as exc:
        print(f"angle-export: error: {exc}", file=sys.stderr)
        return 2
    print(summary(bundle))
    return 0


def summary(bundle: Path) -> str:
    """Bundle path, artifacts and their parity figures, for humans."""
    manifest = json.loads((bundle / "angle_rt.json").read_text())
    lines = [f"bundle: {bundle}",
             f"  {manifest['model_type']} {manifest['architecture']}, pooling "
             f"{manifest['pooling']}, dim {manifest['embedding_dim']}, max_length "
             f"{manifest['max_length']}, normalized {manifest['normalized']}"]
    for art in manifest["artifacts"]:
        p = art.get("parity")
        fig = (f"min cos {p['min_cosine']:.7f}, mean {p['mean_cosine']:.7f}, max |diff| "
               f"{p['max_abs_diff']:.2e} on {p['n']} texts" if p else "not verified")
        lines.append(f"  {art['file']} ({art['precision']}, {art['size_bytes'] / 1e6:.1f} MB): "
                     f"{fig}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
