"""`angle-rt embed BUNDLE INPUT OUTPUT`: the file job from the command line.

`add_embed_parser(subparsers)` adds the subcommand to the `angle-rt` parser;
`python -m angle_rt.embed ...` runs `main`. Exit status: 0 done (or already complete),
1 bad input data (a missing column, a bad row), 2 bad arguments, bundle or environment, or
an OUTPUT written with other arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from angle_rt.embed.errors import InputError
from angle_rt.embed.writers import COMPRESSIONS
from angle_rt.errors import AngleRTError
from angle_rt.quantization import PRECISIONS

PROG = "angle-rt embed"
DESCRIPTION = (
    "Embed the texts of INPUT (.parquet or a directory of them, .jsonl, .csv, .txt with one "
    "text a line) into OUTPUT (.parquet: ids + a fixed-size list column 'embedding'; .npy; "
    "or a directory of Parquet parts). Streams in chunks; rerun with the same arguments "
    "after a crash to resume."
)


def add_embed_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the `embed` subcommand (all flags, `func=` the handler) to an argparse CLI."""
    parser = subparsers.add_parser("embed", help="embed a file of texts (Parquet/JSONL/CSV/"
                                   "TXT) into vectors, resumable; --ray for a Ray cluster",
                                   description=DESCRIPTION)
    add_arguments(parser)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", metavar="BUNDLE", help="bundle directory (angle-export -o)")
    parser.add_argument("input", metavar="INPUT", help=".parquet (or a directory of them), "
                        ".jsonl, .csv or .txt; a path or a URI (s3://, gs://, hdfs://)")
    parser.add_argument("output", metavar="OUTPUT", help=".parquet, .npy, or a directory "
                        "(no suffix) of Parquet parts; a path or a URI (Parquet only)")
    data = parser.add_argument_group("data")
    data.add_argument("--text-column", default="text", help="column with the texts (text)")
    data.add_argument("--id-column", default=None,
                      help="column with the ids to write (default: row numbers, from 0)")
    data.add_argument("--on-bad-row", choices=("error", "skip"), default="error",
                      help="a null or non-str text: stop naming it (error), or leave it out "
                      "and list it in OUTPUT.skipped.jsonl (skip)")
    data.add_argument("--compression", default=None, choices=COMPRESSIONS,
                      help="Parquet codec (default zstd; not for .npy)")
    data.add_argument("--rows-per-file", type=int, default=None, metavar="N",
                      help="directory OUTPUT: files of N rows (default: one per chunk)")
    data.add_argument("--overwrite", action="store_true",
                      help="replace an OUTPUT (or an interrupted one) written with other "
                      "arguments; the same job's interrupted run is always resumed")
    model = parser.add_argument_group("encoding")
    prompt = model.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=None, help="template with {text}, prefix, or "
                        "prompt name (default: the bundle's; '' for none)")
    prompt.add_argument("--prompt-name", default=None, help="a prompt name (A, B, C, ...)")
    model.add_argument("--normalize", action="store_true", help="L2-normalize the vectors")
    model.add_argument("--dimensions", type=int, default=None,
                       help="keep the first N dimensions (Matryoshka), before normalizing")
    model.add_argument("--precision", default=None, help="artifact to run (fp32, fp16, int8, "
                       "int8-dynamic, ...; default: the best for the device)")
    model.add_argument("--layers", type=int, default=None, metavar="K",
                       help="the depth-K variant of an ESE bundle (angle-export --layers)")
    model.add_argument("--output-dtype", choices=PRECISIONS, default="float32",
                       help="quantize the vectors (int8/uint8 ranges from the first chunk, "
                       "stored in the output's metadata; binary: sign bits packed)")
    model.add_argument("--output-ranges", default=None, metavar="FILE",
                       help="int8/uint8 ranges to quantize with (angle-rt calibrate's .npy or "
                       "a job record), so every shard and the server share one code book; "
                       "default: calibrated on the first chunk")
    model.add_argument("--batch-size", type=int, default=32, help="texts per model batch (32)")
    model.add_argument("--chunk-size", type=int, default=4096,
                       help="rows per chunk: a row group, the resume step (4096)")
    model.add_argument("--threads", type=int, default=None,
                       help="ONNX Runtime threads, one batch at a time (default: one "
                            "batch a physical core side by side, one thread each)")
    model.add_argument("--backend", default="auto", choices=("auto", "tensorrt", "cuda", "cpu"))
    run = parser.add_argument_group("running")
    bar = run.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None,
                     help="show a progress bar (default: when stderr is a terminal)")
    bar.add_argument("--no-progress", dest="progress", action="store_false")
    run.add_argument("-q", "--quiet", action="store_true", help="no summary line")
    ray = parser.add_argument_group("Ray (pip install 'angle-rt[ray]')")
    ray.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                     help="run on a Ray cluster (ADDRESS, e.g. ray://head:10001 or auto; "
                     "without one: a local Ray on this machine); OUTPUT is a directory")
    ray.add_argument("--ray-actors", default=None, metavar="N|MIN-MAX",
                     help="encoder actors (default: 1 to CPUs / --ray-cpus-per-actor)")
    ray.add_argument("--ray-cpus-per-actor", type=float, default=1.0,
                     help="CPUs per actor, also its ONNX Runtime threads (1)")
    ray.add_argument("--ray-gpus-per-actor", type=float, default=0.0,
                     help="GPUs per actor; > 0 runs the bundle's GPU artifact (0)")
    ray.add_argument("--ray-cpus", type=int, default=None,
                     help="CPUs of the local Ray (without ADDRESS; default: all)")
    ray.add_argument("--ray-ship-bundle", action="store_true",
                     help="send the bundle to the workers through the object store (when "
                     "BUNDLE is not on storage every node reads)")
    parser.set_defaults(func=run_embed)


def run_embed(args: argparse.Namespace) -> int:
    """The handler: run the job, print a summary, map errors to the exit status."""
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    run = _run_ray if args.ray is not None else _run_local
    return _exit_status(PROG, lambda: run(args, progress), args.quiet)


def _exit_status(prog: str, job: Callable[[], str], quiet: bool = False) -> int:
    """Run `job`; print its summary line (unless `quiet`) or its error. 0 done, 1 bad input
    data, 2 bad arguments, bundle or environment."""
    try:
        summary = job()
    except InputError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except (AngleRTError, ValueError, OSError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if not quiet:
        print(summary, file=sys.stderr)
    return 0


def _run_local(args: argparse.Namespace, progress: bool) -> str:
    from angle_rt.embed.job import embed_file

    r = embed_file(args.bundle, args.input, args.output, text_column=args.text_column,
                   id_column=args.id_column, prompt=args.prompt, prompt_name=args.prompt_name,
                   normalize=args.normalize, dimensions=args.dimensions,
                   precision=args.precision, layers=args.layers,
                   output_dtype=args.output_dtype, output_ranges=args.output_ranges,
                   compression=args.compression, rows_per_file=args.rows_per_file,
                   on_bad_row=args.on_bad_row, overwrite=args.overwrite,
                   chunk_size=args.chunk_size, batch_size=args.batch_size,
                   intra_op_threads=args.threads, backend=args.backend, progress=progress)
    if r.complete_before:
        return f"{r.output} is complete already ({r.rows} vectors); nothing to do"
    resumed = f", resumed at row {r.resumed_from}" if r.resumed_from else ""
    skipped = f"; {r.skipped} bad rows skipped (listed in {r.output}.skipped.jsonl)" \
        if r.skipped else ""
    return (f"wrote {r.rows} vectors ({r.dim}-d, {r.output_dtype}) to {r.output} in "
            f"{r.seconds:.1f} s ({r.rate:.0f} rows/s{resumed}){skipped}")


def _run_ray(args: argparse.Namespace, progress: bool) -> str:
    from angle_rt.ray import embed_files_on_ray

    meta = embed_files_on_ray(
        args.bundle, args.input, args.output, address=args.ray, text_column=args.text_column,
        id_column=args.id_column, prompt=args.prompt, prompt_name=args.prompt_name,
        normalize=args.normalize, dimensions=args.dimensions, precision=args.precision,
        layers=args.layers, output_dtype=args.output_dtype,
        output_ranges=args.output_ranges, compression=args.compression,
        rows_per_file=args.rows_per_file,
        on_bad_row=args.on_bad_row, overwrite=args.overwrite,
        chunk_size=args.chunk_size, batch_size=args.batch_size,
        concurrency=parse_actors(args.ray_actors), num_cpus_per_actor=args.ray_cpus_per_actor,
        num_gpus_per_actor=args.ray_gpus_per_actor, num_cpus=args.ray_cpus,
        ship_bundle=args.ray_ship_bundle, progress=progress)
    if "seconds" not in meta:
        return f"{args.output} is complete already ({meta['rows']} vectors); nothing to do"
    skipped = f"; {meta['skipped']} bad rows skipped" if meta["skipped"] else ""
    return (f"wrote {meta['rows']} vectors ({meta['dim']}-d, {meta['output_dtype']}) to "
            f"{args.output}/ with Ray in {meta['seconds']:.1f} s{skipped}")


def parse_actors(text: str | None) -> int | tuple[int, int] | None:
    """`N` → N actors, `MIN-MAX` → an autoscaling pool, None → the default.

    >>> parse_actors("4"), parse_actors("2-8"), parse_actors(None)
    (4, (2, 8), None)
    """
    if text is None:
        return None
    try:
        low, _, high = text.partition("-")
        n = (int(low), int(high)) if high else int(low)
    except ValueError:
        raise ValueError(f"--ray-actors must be N or MIN-MAX, got {text!r}") from None
    if min(n if isinstance(n, tuple) else (n,)) < 1:
        raise ValueError(f"--ray-actors must be ≥ 1, got {text!r}")
    return n


def add_calibrate_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the `calibrate` subcommand: int8/uint8 ranges from a sample of a corpus."""
    p = subparsers.add_parser(
        "calibrate", help="int8/uint8 ranges from a sample of a corpus (for --output-ranges)",
        description="Encode a sample of INPUT spread over its rows and write each "
                    "dimension's (min, max) to RANGES (.npy): pass it to every `angle-rt "
                    "embed --output-dtype int8 --output-ranges RANGES` shard and to `angle-rt "
                    "serve --output-ranges RANGES`, so all quantize alike.")
    p.add_argument("bundle", metavar="BUNDLE", help="bundle directory (angle-export -o)")
    p.add_argument("input", metavar="INPUT", help="corpus, as angle-rt embed reads it")
    p.add_argument("output", metavar="RANGES", help="where to write the ranges (.npy)")
    p.add_argument("--rows", type=int, default=10_000, help="sample size (10000)")
    p.add_argument("--text-column", default="text", help="column with the texts (text)")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=None, help="as angle-rt embed's")
    prompt.add_argument("--prompt-name", default=None, help="as angle-rt embed's")
    p.add_argument("--normalize", action="store_true", help="as angle-rt embed's")
    p.add_argument("--dimensions", type=int, default=None, help="as angle-rt embed's")
    p.add_argument("--precision", default=None, help="artifact to run (as angle-rt embed's)")
    p.add_argument("--layers", type=int, default=None, metavar="K", help="depth variant")
    p.set_defaults(func=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    from angle_rt.embed.calibrate import calibrate_file

    def job() -> str:
        ranges = calibrate_file(args.bundle, args.input, args.output, rows=args.rows,
                                text_column=args.text_column, precision=args.precision,
                                layers=args.layers, prompt=args.prompt,
                                prompt_name=args.prompt_name,
                                normalize_embeddings=args.normalize,
                                truncate_dim=args.dimensions)
        return f"wrote {ranges.shape[1]}-d int8/uint8 ranges to {args.output}"

    return _exit_status("angle-rt calibrate", job)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m angle_rt.embed BUNDLE INPUT OUTPUT [flags]`; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.func(args)
