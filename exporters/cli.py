"""`angle-export`: a thin argparse shim over `exporters.export`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from angle_rt.errors import AngleRTError, ParityError

SUBCOMMANDS = ("export", "build-engine")


def build_parser() -> argparse.ArgumentParser:
    """`angle-export [export] --model ...` and `angle-export build-engine BUNDLE`."""
    p = argparse.ArgumentParser(
        prog="angle-export",
        description="Export an AnglE / sentence-embedding model to an angle_rt bundle "
                    "(ONNX graph with pooling inside + tokenizer + manifest), verified "
                    "against PyTorch; build TensorRT engines from a bundle.",
        epilog="Without a subcommand, `export` is assumed (angle-export --model M ...). "
               "Exit codes: 0 ok, 1 a parity gate failed (nothing written), 2 bad "
               "arguments, model or environment.")
    sub = p.add_subparsers(dest="command", metavar="{export,build-engine}")
    add_export_args(sub.add_parser(
        "export", help="model → bundle (the default subcommand)",
        description="Export a model to an angle_rt bundle, each artifact gated against "
                    "PyTorch."))
    add_build_engine_args(sub.add_parser(
        "build-engine", help="bundle → TensorRT engines, on the GPU machine that will run "
                             "them",
        description="Build TensorRT engines from an existing bundle, on the GPU machine that "
                    "will run them (engines are specific to GPU type and TensorRT version)."))
    return p


def add_export_args(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--lora", help="peft LoRA adapter directory (any task type, e.g. "
                                  "angle_emb's CAUSAL_LM LLM adapters), merged before export")
    p.add_argument("--billm-start", type=int, help="BiLLM/BeLLM: decoder layers ≥ K attend "
                   "bidirectionally (angle_emb's BiLLM_START_INDEX; -1 off; default: as "
                   "saved in angle_config.json)")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: 17, the first with one "
                                             "LayerNormalization op)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    p.add_argument("--verify-data", help=".txt (one text per line) or .jsonl texts for the "
                                         "parity gate (default: the built-in set)")
    p.add_argument("--verify-size", type=int, help="texts the parity gate checks (default: "
                   "all ~1,384 below 1B parameters; above, a 256-text sample stratified by "
                   "length that keeps every worst-case input)")
    d = p.add_argument_group("depth and width variants (ESE / Matryoshka models)")
    d.add_argument("--layers", type=_int_list, default=(), help="comma list of depths: "
                   "also export the backbone cut after each (model.L<k>*.onnx, every "
                   "precision, each gated); pick one with Encoder(path, layers=k). A student "
                   "distilled into MODEL/layers-k (python -m training.depth) replaces the cut")
    d.add_argument("--plain-cuts", action="store_true", help="export the cut of the full "
                   "model even where MODEL/layers-k holds a distilled student")
    d.add_argument("--dims", type=_int_list, default=(), help="comma list of widths at "
                   "which every artifact's STS-B dev Spearman is recorded (with --layers: "
                   "always, at the full width)")
    g = p.add_argument_group("precision (each adds an artifact beside the fp32 model.onnx)")
    g.add_argument("--fp16", action="store_true", help="mixed-precision FP16 graph "
                   "(FP32 norms, softmax, mask add, reductions, pooling)")
    g.add_argument("--bf16", action="store_true", help="the same in BF16 (Llama family)")
    g.add_argument("--int8", action="store_true", help="explicit symmetric Q/DQ INT8 graph "
                   "(TensorRT and ONNX Runtime)")
    g.add_argument("--int8-dynamic", action="store_true",
                   help="dynamic INT8 with per-token activation scales (ONNX Runtime, CPU "
                   "serving; the default CPU artifact)")
    g.add_argument("--calib", help="INT8 calibration texts (.txt or .jsonl; default: built-in)")
    g.add_argument("--calib-size", type=int, help="calibration texts (default: 512)")
    g.add_argument("--int8-method", choices=("mse", "max", "percentile"),
                   help="--int8 activation scales (default: mse)")
    g.add_argument("--fp16-exclude", default="", help="comma list of op types kept in FP32")
    g.add_argument("--int8-exclude", action="append", default=[],
                   help="regex of node names kept in float (repeatable)")
    g.add_argument("--sts-data", help="STS jsonl for the INT8 Spearman gate "
                                      "(default: STS-B dev from the shared data, if found)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the parity gate")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    e = add_engine_args(p)
    e.add_argument("--engine", choices=("auto", "yes", "no"), default="auto",
                   help="build TensorRT engines after the ONNX artifacts: auto = where "
                        "TensorRT and a GPU are present")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}"
                                         ) from None


def add_build_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle directory written by angle-export")
    p.add_argument("--precision", action="append", choices=("fp32", "fp16", "bf16", "int8"),
                   help="repeatable; default: every TensorRT-ready ONNX in the bundle")
    p.add_argument("--no-verify", dest="verify", action="store_false")
    add_engine_args(p)


def add_engine_args(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """TensorRT engine flags, shared by export and build-engine."""
    g = p.add_argument_group("TensorRT engine (optimization profiles per sequence bucket)")
    g.add_argument("--min-batch", type=int, default=1,
                   help="must be 1 (the runtime runs batches of any size from 1)")
    g.add_argument("--opt-batch", type=int, default=32)
    g.add_argument("--max-batch", type=int, default=128)
    g.add_argument("--buckets", default="32,64,128,256,512",
                   help="sequence bucket edges, one profile each (capped at max_length)")
    g.add_argument("--workspace-gb", type=float, default=4.0)
    g.add_argument("--opt-level", type=int, default=3, choices=range(6),
                   help="builder optimization level 0-5 (higher builds slower)")
    g.add_argument("--timing-cache", help="timing cache file, read and written")
    return g


def build_options(args: argparse.Namespace):
    from exporters.trt_build import BuildOptions

    try:
        buckets = tuple(int(b) for b in args.buckets.split(",") if b.strip())
    except ValueError:
        raise ValueError(f"--buckets takes comma-separated integers, got {args.buckets!r}"
                         ) from None
    return BuildOptions(args.min_batch, args.opt_batch, args.max_batch, buckets,
                        args.workspace_gb, args.opt_level, args.timing_cache)


def run_build(bundle: Path, precisions: list[str] | None, args: argparse.Namespace) -> int:
    """Build engines; print what was built, or why not (exit 1 parity, 2 other errors)."""
    from exporters.engines import build_engines

    built, code = _guarded(lambda: build_engines(bundle, precisions, build_options(args),
                                                 args.verify),
                           "engine parity gate failed")
    for art in built or []:
        print(f"{bundle / art.file}: {art.engine['gpu_name']}, TensorRT "
              f"{art.engine['tensorrt_version']}, {len(art.engine['profiles'])} profiles")
    return code


def _guarded(call: Callable[[], Any], failed: str) -> tuple[Any, int]:
    """Run `call`: a failed gate exits 1; anything else that goes wrong exits 2 with a
    one-line message (ANGLE_RT_DEBUG=1 shows the traceback)."""
    try:
        return call(), 0
    except ParityError as exc:
        print(f"angle-export: {failed}:\n{exc}", file=sys.stderr)
        return None, 1
    except (AngleRTError, OSError, ValueError) as exc:
        print(f"angle-export: error: {exc}", file=sys.stderr)
    except ImportError as exc:
        print(f"angle-export: error: {exc}; the exporter needs `pip install angle-rt[export]`",
              file=sys.stderr)
    except Exception as exc:  # torch, transformers, onnx or TensorRT failing mid-way
        print(f"angle-export: error: {type(exc).__name__}: {exc}", file=sys.stderr)
    if os.environ.get("ANGLE_RT_DEBUG"):
        traceback.print_exc()
    return None, 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*SUBCOMMANDS, "-h", "--help"):
        argv = ["export", *argv]
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False)
                        else logging.INFO, format="angle-export: %(message)s")
    # SIGTERM (a CI timeout, `docker stop`) as an exception: the staging directory is
    # removed as on any error (the default action left it behind, hidden, for good)
    signal.signal(signal.SIGTERM, _terminated)
    try:
        if args.command == "build-engine":
            return run_build(Path(args.bundle), args.precision, args)
        return export_main(args)
    except KeyboardInterrupt:  # Ctrl-C: an export's staging directory is already removed
        done = "; nothing written" if args.command != "build-engine" else ""
        print(f"angle-export: interrupted{done}", file=sys.stderr)
        return 130


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def export_main(args: argparse.Namespace) -> int:
    out = args.output or str(Path("build") / Path(args.model.rstrip("/")).name)
    _, code = _guarded(lambda: check_flags(args), "")
    if code:
        return code

    def run() -> Path:
        from exporters.onnx_export import DEFAULT_OPSET  # torch: after argument errors
        from exporters.pipeline import export

        opset = DEFAULT_OPSET if args.opset is None else args.opset
        # left out when not given: PrecisionPlan holds their defaults
        given = {k: v for k, v in (("calib_size", args.calib_size),
                                   ("int8_method", args.int8_method)) if v is not None}
        return export(args.model, out, pooling=args.pooling, max_length=args.max_length,
                      prompt=args.prompt, normalize=args.normalize,
                      padding_side=args.padding_side, lora=args.lora,
                      billm_start=args.billm_start,
                      revision=args.revision, opset=opset, force=args.force,
                      verify=args.verify, verify_data=args.verify_data,
                      verify_size=args.verify_size,
                      sts_data=args.sts_data, trust_remote_code=args.trust_remote_code,
                      progress=not args.quiet, fp16=args.fp16, bf16=args.bf16,
                      int8=args.int8, int8_dynamic=args.int8_dynamic, calib=args.calib,
                      fp16_exclude=_op_list(args.fp16_exclude),
                      int8_exclude=tuple(args.int8_exclude), layers=args.layers,
                      dims=args.dims, distilled=not args.plain_cuts, **given)

    bundle, code = _guarded(run, "parity gate failed, nothing written")
    if code:
        return code
    print(summary(bundle))
    return engines_after_export(bundle, args)


# flags that only one kind of artifact uses: given without it they would do nothing
_NEEDS = (("--calib", "calib", ("int8", "int8_dynamic"), "--int8 or --int8-dynamic"),
          ("--calib-size", "calib_size", ("int8", "int8_dynamic"), "--int8 or --int8-dynamic"),
          ("--int8-method", "int8_method", ("int8",), "--int8"),
          ("--int8-exclude", "int8_exclude", ("int8", "int8_dynamic"),
           "--int8 or --int8-dynamic"),
          ("--fp16-exclude", "fp16_exclude", ("fp16", "bf16"), "--fp16 or --bf16"))


def _op_list(text: str) -> tuple[str, ...]:
    return tuple(o.strip() for o in text.split(",") if o.strip())


def check_flags(args: argparse.Namespace) -> None:
    """Refuse, before the model loads, flags this export would ignore or fail on after its
    artifacts are built (a calibration flag without INT8, a bad --buckets, ...)."""
    if args.output is not None and not args.output.strip():
        raise ValueError("-o/--output is empty: name the bundle directory")
    for flag, attr, modes, needs in _NEEDS:
        if getattr(args, attr) and not any(getattr(args, m) for m in modes):
            raise ValueError(f"{flag} applies to {needs}, which this export does not build")
    if args.calib_size is not None and args.calib_size < 1:
        raise ValueError(f"--calib-size must be ≥ 1, got {args.calib_size}")
    given = engine_flags(args)
    if given and (args.engine == "no" or (args.engine == "auto" and not engine_precisions(args))):
        raise ValueError(f"{given.split()[0]} applies to TensorRT engines, which this export "
                         "does not build (add --fp16, --bf16 or --int8, or --engine yes)")
    build_options(args)  # bad batch bounds or buckets: now, not after the export


def engine_flags(args: argparse.Namespace) -> str:
    """The engine flags given with other than their defaults, as build-engine takes them."""
    defaults = argparse.ArgumentParser()
    add_engine_args(defaults)
    parts = []
    for action in defaults._actions:
        if action.dest != "help" and getattr(args, action.dest) != action.default:
            parts.append(f"{action.option_strings[0]} "
                         f"{shlex.quote(str(getattr(args, action.dest)))}")
    return " ".join(parts)


def engine_precisions(args: argparse.Namespace) -> list[str]:
    return [p for p, on in (("fp16", args.fp16), ("bf16", args.bf16), ("int8", args.int8))
            if on]


def engines_after_export(bundle: Path, args: argparse.Namespace) -> int:
    """Build engines where TensorRT is present; otherwise say how to build them later."""
    from angle_rt.session.trt import tensorrt_available

    wanted = engine_precisions(args)
    if args.engine == "no" or (args.engine == "auto" and not wanted):
        return 0
    reason = tensorrt_available()
    if reason is not None:
        flags = " ".join([*(f"--precision {p}" for p in wanted), engine_flags(args)])
        print(f"TensorRT engines not built here ({reason}). On the GPU machine that will "
              f"serve, run:\n  angle-export build-engine {bundle} {flags}".rstrip())
        return 2 if args.engine == "yes" else 0
    return run_build(bundle, wanted or ["fp32"], args)


def summary(bundle: Path) -> str:
    """Bundle path, artifacts and their parity figures, for humans."""
    manifest = json.loads((bundle / "angle_rt.json").read_text())
    lines = [f"bundle: {bundle}",
             f"  {manifest['model_type']} {manifest['architecture']}, pooling "
             f"{manifest['pooling']}, dim {manifest['embedding_dim']}, max_length "
             f"{manifest['max_length']}, normalized {manifest['normalized']}"]
    for art in manifest["artifacts"]:
        p = art.get("parity") or {}  # --no-verify with --layers: only the variants' scores
        fig = (f"min cos {p['min_cosine']:.7f}, mean {p['mean_cosine']:.7f}, max |diff| "
               f"{p['max_abs_diff']:.2e} on {p['n']} texts" if "min_cosine" in p
               else "not verified")
        if "stsb_dev" in p:
            fig += f"; STS-B dev {p['stsb_dev']:.2f} (fp32 {p['stsb_dev_fp32']:.2f})"
        lines.append(f"  {art['file']} ({art['precision']}, {art['size_bytes'] / 1e6:.1f} MB): "
                     f"{fig}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
