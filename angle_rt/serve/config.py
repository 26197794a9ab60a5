"""`angle-rt serve` settings: one dataclass, the argparse flags that fill it, and their
parsers. No web imports, so `angle-rt --help` works without the [serve] extra."""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from angle_rt.encoder import DEFAULT_MAX_BATCH_TOKENS
from angle_rt.quantization import PRECISIONS, needs_ranges, read_ranges

API_KEY_ENV = "ANGLE_RT_API_KEY"
BACKENDS = ("auto", "tensorrt", "cuda", "cpu")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9,
          "ki": 2**10, "mi": 2**20, "gi": 2**30}


@dataclass(frozen=True)
class ModelSpec:
    """One served bundle: the name clients pass as `model`, its path, and the depth variant
    of an ESE bundle to serve (None: the full model, or `--layers`)."""

    name: str
    path: Path
    layers: int | None = None


@dataclass
class ServeConfig:
    """Everything `angle-rt serve` takes; the defaults are the CLI's."""

    models: list[ModelSpec]
    host: str = "127.0.0.1"
    port: int = 8080
    precision: str | None = None
    backend: str = "auto"
    threads: int | None = None  # ONNX Runtime threads a batch (default: server.cpu_threads)
    spin: bool = False  # ONNX Runtime's idle intra-op threads spin-wait (off: they sleep)
    layers: int | None = None  # depth variant for bundles without their own @K
    output_dtype: str = "float32"  # vectors' dtype when a request names none
    output_ranges: Path | None = None  # int8/uint8 calibration ranges (.npy or job record)
    api_key: str | None = field(default=None, repr=False)
    payload_limit: int = 2_000_000  # bytes of one request body (TEI's default)
    truncate: bool = True  # cut texts at max_length; False: 422
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS  # padded tokens per batch
    max_batch_size: int = 32  # inputs per batch
    max_wait_ms: float = 0.0  # hold a batch open for more inputs
    max_concurrent_requests: int = 512  # requests in flight, over all models (429 beyond)
    max_queued_tokens: int = 1_048_576  # tokens waiting per model (429 beyond)
    max_client_batch_size: int = 2048  # inputs per request (422 beyond)
    max_request_tokens: int = 524_288  # tokens of one request after truncation (413 beyond)
    fair_quantum_tokens: int | None = None  # tokens of a request's turn (None: by device)
    lane_tokens: int | None = None  # small requests' lane beside the workers (None: by device)
    request_timeout: float = 60.0  # seconds from arrival to answer (504 beyond)
    body_timeout: float = 10.0  # seconds to receive a request body (408 beyond)
    workers: int | None = None  # inference threads per model (default: CPU cores, 2 TensorRT)
    graceful_timeout: float = 30.0  # seconds to finish in-flight requests on SIGTERM
    log_level: str = "info"
    log_format: str = "json"
    access_log: bool = True
    request_id_header: bool = True  # off behind Ray Serve's proxy, which sets its own


def parse_size(text: str) -> int:
    """Bytes from ``2000000``, ``2MB``, ``2MiB``, ``512k``.

    >>> parse_size("2MB"), parse_size("2MiB"), parse_size("512k"), parse_size("100")
    (2000000, 2097152, 512000, 100)
    """
    m = _SIZE.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2000000, 2MB, 2MiB)")
    unit = (m.group(2) or "").lower().rstrip("b")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be ≥ 1 byte, got {text!r}")
    return value


def parse_models(bundles: list[str], first_name: str | None = None) -> list[ModelSpec]:
    """``PATH`` or ``NAME=PATH`` per bundle, each optionally ``@K`` for the depth-K variant of
    an ESE bundle; an unnamed bundle is called `first_name` (for the first) or its
    directory's name (plus ``@K``). Names must differ."""
    specs = []
    for i, arg in enumerate(bundles):
        name, sep, path = arg.partition("=")
        if not sep or "/" in name or not name:
            name, path = "", arg
        path, layers = _split_layers(path)
        path_obj = Path(path).expanduser()
        if not name:
            resolved = path_obj.resolve()
            bundle_dir = resolved.parent if resolved.is_file() else resolved
            name = first_name if i == 0 and first_name else bundle_dir.name
            name += f"@{layers}" if layers and not (i == 0 and first_name) else ""
        specs.append(ModelSpec(name, path_obj, layers))
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"two bundles are served as {', '.join(dupes)}; name them: "
                         "NAME=BUNDLE")
    return specs


def _split_layers(path: str) -> tuple[str, int | None]:
    """``build/ese@3`` → (``build/ese``, 3), unless a file or directory has that very name.

    >>> _split_layers("build/ese@3"), _split_layers("build/minilm")
    (('build/ese', 3), ('build/minilm', None))
    """
    m = re.fullmatch(r"(.+)@(\d+)", path)
    if m is None or Path(path).expanduser().exists():
        return path, None
    if int(m.group(2)) < 1:
        raise ValueError(f"{path}: the depth after @ must be ≥ 1")
    return m.group(1), int(m.group(2))


def _positive(kind: type) -> object:
    def check(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    check.__name__ = kind.__name__
    return check


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0…65535, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {text}")
    return value


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """Declare `angle-rt serve`'s flags on `p`."""
    pos_int, pos_float = _positive(int), _positive(float)
    p.add_argument("bundles", nargs="+", metavar="BUNDLE",
                   help="bundle directory (or artifact); more as NAME=BUNDLE, selected by the "
                        "request's `model`; BUNDLE@K serves an ESE bundle's depth-K variant")
    net = p.add_argument_group("network")
    net.add_argument("--host", metavar="ADDR", default="127.0.0.1",
                     help="address to bind (default: 127.0.0.1; 0.0.0.0 exposes the server)")
    net.add_argument("--port", metavar="N", type=_port, default=8080,
                     help="TCP port (default: 8080; 0: a free one, named in the log's "
                          "`listening` line)")
    net.add_argument("--api-key", metavar="KEY",
                     help=f"require `Authorization: Bearer KEY` (default: ${API_KEY_ENV}); "
                          "/health, /ready and /metrics stay open")
    net.add_argument("--payload-limit", metavar="SIZE", type=parse_size, default=2_000_000,
                     help="largest request body (default: 2MB; 413 beyond)")
    model = p.add_argument_group("model")
    model.add_argument("--served-model-name", metavar="NAME",
                       help="name of the first bundle (default: its directory name)")
    model.add_argument("--precision", metavar="P",
                       help="artifact to serve (default: the best for the device, as "
                            "Encoder picks it)")
    model.add_argument("--backend", choices=BACKENDS, default="auto")
    model.add_argument("--layers", metavar="K", type=pos_int,
                       help="serve the depth-K variant of ESE bundles (angle-export --layers) "
                            "that have no @K of their own")
    model.add_argument("--threads", metavar="N", type=pos_int,
                       help="ONNX Runtime intra-op threads a batch (default: 1 a worker, "
                            "the workers one a core; with --workers N cores/N; with --spin "
                            "one worker on the cores but one)")
    model.add_argument("--spin", action=argparse.BooleanOptionalAction, default=False,
                       help="let ONNX Runtime's idle threads spin-wait (default: off, they "
                            "sleep and leave the cores to the event loop)")
    model.add_argument("--output-dtype", default="float32", choices=PRECISIONS,
                       help="vectors' dtype when a request names no output_dtype (default: "
                            "float32): quantize_embeddings as sentence-transformers does")
    model.add_argument("--output-ranges", metavar="FILE", type=Path,
                       help="int8/uint8 calibration ranges: a (2, dim) .npy from "
                            "angle_rt.quantization.calibration_ranges, or an `angle-rt "
                            "embed` job record (.json) holding them")
    model.add_argument("--truncate", action=argparse.BooleanOptionalAction, default=True,
                       help="cut texts past max_length (default); --no-truncate answers 422 "
                            "naming the input")
    batch = p.add_argument_group("batching and admission")
    batch.add_argument("--max-batch-tokens", metavar="N", type=pos_int,
                       default=DEFAULT_MAX_BATCH_TOKENS,
                       help="padded tokens per batch (default: %(default)s, as Encoder)")
    batch.add_argument("--max-batch-size", metavar="N", type=pos_int, default=32,
                       help="inputs per batch (default: %(default)s)")
    batch.add_argument("--max-wait-ms", metavar="MS", type=float, default=0.0,
                       help="hold a batch open this long for more inputs (default: 0, none)")
    batch.add_argument("--max-concurrent-requests", metavar="N", type=pos_int, default=512,
                       help="requests in flight (default: %(default)s; 429 beyond)")
    batch.add_argument("--max-queued-tokens", metavar="N", type=pos_int, default=1_048_576,
                       help="tokens waiting per model (default: %(default)s; 429 beyond)")
    batch.add_argument("--max-client-batch-size", metavar="N", type=pos_int, default=2048,
                       help="inputs per request (default: %(default)s; split into batches, "
                            "422 beyond)")
    batch.add_argument("--max-request-tokens", metavar="N", type=pos_int, default=524_288,
                       help="tokens of one request, after truncation (default: %(default)s, "
                            "2,048 inputs of 256; 413 beyond)")
    batch.add_argument("--fair-quantum-tokens", metavar="N", type=pos_int,
                       help="tokens of one request's turn; requests take turns round-robin "
                            "(default: 256 a thread of a worker on CPU, 8192 on GPU; "
                            "smaller: a light request waits less behind a flood, the flood "
                            "runs slower)")
    batch.add_argument("--lane-tokens", metavar="N", type=_non_negative_int,
                       help="a lane beside the workers for new requests of ≤ N padded tokens "
                            "in all, used only while every worker runs a turn of a larger "
                            "request (default: 128 on CPU, 0 = none on GPU; 0 turns it off)")
    batch.add_argument("--request-timeout", metavar="S", type=pos_float, default=60.0,
                       help="seconds from a request's arrival to its answer (default: 60; "
                            "504 beyond, its queued inputs dropped)")
    batch.add_argument("--body-timeout", metavar="S", type=pos_float, default=10.0,
                       help="seconds to receive a request body (default: 10; 408 beyond)")
    batch.add_argument("--workers", metavar="N", type=pos_int,
                       help="inference threads per model (default: on CPU one a physical "
                            "core, each on one ONNX Runtime thread, or 1 with --threads "
                            "or --spin; 2 on TensorRT)")
    ray = p.add_argument_group("Ray Serve (past one machine; needs the [ray] extra)")
    ray.add_argument("--ray", metavar="ADDRESS", nargs="?", const="local",
                     help="serve as a Ray Serve deployment: on a Ray started here (no "
                          "ADDRESS) or a cluster's ('auto', ray://…); --host/--port are "
                          "its proxy's")
    ray.add_argument("--ray-replicas", metavar="N", type=pos_int,
                     help="replicas, each with its own models (default: 1)")
    ray.add_argument("--ray-autoscale", metavar="MIN:MAX",
                     help="autoscale between MIN and MAX replicas on ongoing requests "
                          "(instead of --ray-replicas)")
    ray.add_argument("--ray-target-ongoing", metavar="N", type=pos_float,
                     help="ongoing requests per replica the autoscaler aims at (default: 32; "
                          "with --ray-autoscale)")
    ray.add_argument("--ray-cpus-per-replica", metavar="N", type=pos_float,
                     help="CPUs per replica (default: 1); a replica runs one inference "
                          "worker on that many ONNX Runtime threads unless --workers / "
                          "--threads say otherwise")
    ray.add_argument("--ray-gpus-per-replica", metavar="N", type=float,
                     help="GPUs per replica (default: 0)")
    ops = p.add_argument_group("operations")
    ops.add_argument("--graceful-timeout", metavar="S", type=pos_float, default=30.0,
                     help="seconds SIGTERM waits for in-flight requests (default: 30)")
    ops.add_argument("--log-level", default="info",
                     choices=("critical", "error", "warning", "info", "debug"))
    ops.add_argument("--log-format", default="json", choices=("json", "text"))
    ops.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                     help="one log line per request (default: on)")


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """A ServeConfig from `add_serve_args`' namespace (ValueError on bad bundle names, or
    output ranges missing or unreadable)."""
    if args.output_ranges is not None:
        read_ranges(args.output_ranges)
    elif needs_ranges(args.output_dtype):
        raise ValueError(f"--output-dtype {args.output_dtype} needs --output-ranges (a (2, "
                         "dim) .npy of calibration_ranges, or an angle-rt embed job record)")
    return ServeConfig(
        models=parse_models(args.bundles, args.served_model_name),
        host=args.host, port=args.port, precision=args.precision, backend=args.backend,
        threads=args.threads, spin=args.spin, layers=args.layers,
        output_dtype=args.output_dtype, output_ranges=args.output_ranges,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        payload_limit=args.payload_limit,
        truncate=args.truncate, max_batch_tokens=args.max_batch_tokens,
        max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
        max_concurrent_requests=args.max_concurrent_requests,
        max_queued_tokens=args.max_queued_tokens,
        max_client_batch_size=args.max_client_batch_size,
        max_request_tokens=args.max_request_tokens,
        fair_quantum_tokens=args.fair_quantum_tokens, lane_tokens=args.lane_tokens,
        request_timeout=args.request_timeout,
        body_timeout=args.body_timeout, workers=args.workers,
        graceful_timeout=args.graceful_timeout, log_level=args.log_level,
        log_format=args.log_format, access_log=args.access_log)
