"""Ray Data: embed a Dataset's text column on a cluster (`pip install 'angle-rt[ray]'`).

`embed_dataset(ds, bundle)` adds an ``embedding`` column through a class-based UDF, so each
actor opens the bundle once (checking its checksums), runs ONNX Runtime with as many threads
as the actor has CPUs (so actors don't oversubscribe a node's cores), and, given GPUs, the
bundle's GPU artifact. `embed_files_on_ray` is `angle-rt embed --ray`: the file job with
Ray Data's Parquet reader and writer.

Nothing here is imported by `import angle_rt`; ray and pyarrow are imported on first use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from angle_rt.embed import _deps
from angle_rt.embed import writers as w
from angle_rt.embed.errors import InputError, OutputExistsError
from angle_rt.embed.fs import Location
from angle_rt.embed.job import (
    RECORD_VERSION,
    _id_kind,
    differences,
    given_ranges,
    id_problem,
    ranges_digest,
)
from angle_rt.embed.lock import lock_output
from angle_rt.embed.readers import bad_reason, input_format, open_input
from angle_rt.encoder import Encoder
from angle_rt.manifest import MANIFEST_FILE, read_manifest, sha256_file
from angle_rt.quantization import (
    calibration_ranges,
    check_precision,
    needs_ranges,
    quantize_embeddings,
    quantized_dtype,
    quantized_width,
)

# Keeps a Ray started here (no address) on the loopback interface: on Linux Ray otherwise
# listens on every interface, for workers of other machines to join.
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
BUNDLE_CACHE = Path(tempfile.gettempdir()) / "angle-rt-bundles"
ROWS_PER_FILE = 65536  # --ray output files: ≥ 100 MB of 384-d float32 vectors


class BundleEmbedder:
    """Ray Data UDF (`map_batches` with pyarrow batches): one Encoder per actor.

    `shipped` is an ObjectRef (in a list) of the bundle's files from `ship_bundle=True`;
    they are unpacked once per node under BUNDLE_CACHE. Subclass and override `embed` to
    post-process vectors.
    """

    def __init__(self, bundle: str, text_column: str = "text", *,
                 output_column: str = "embedding", threads: int = 1, use_gpu: bool = False,
                 precision: str | None = None, layers: int | None = None,
                 output_dtype: str = "float32", ranges: list[list[float]] | None = None,
                 on_bad_row: str = "error",
                 skipped_dir: str | None = None, id_column: str | None = None,
                 encode_kwargs: dict[str, Any] | None = None,
                 shipped: list[Any] | None = None) -> None:
        # the tokenizer's Rust thread pool reads this once, on first use
        os.environ["RAYON_NUM_THREADS"] = str(threads)
        path = _unpack(shipped[0]) if shipped else bundle
        self.encoder = Encoder(path, precision=precision, layers=layers,
                               backend="auto" if use_gpu else "cpu", intra_op_threads=threads)
        self.text_column, self.output_column = text_column, output_column
        self.output_dtype, self.on_bad_row = output_dtype, on_bad_row
        self.ranges = None if ranges is None else np.asarray(ranges, dtype=np.float32)
        self.skipped_dir, self.id_column = skipped_dir, id_column
        self.encode_kwargs = encode_kwargs or {}

    def __call__(self, batch: Any) -> Any:
        texts = batch.column(self.text_column).to_pylist()
        ids = (batch.column(self.id_column).to_pylist()
               if self.id_column in batch.column_names else [0] * len(texts))
        bad = [(k, why) for k, (rid, t) in enumerate(zip(ids, texts, strict=True))
               if (why := _row_problem(rid, t)) is not None]
        if bad:
            batch, texts = self._drop_bad(batch, texts, bad)
        vectors = self.embed(texts)
        return batch.append_column(self.output_column,
                                   w.vector_column(vectors, self.output_dtype))

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), width) vectors of the output dtype."""
        vectors = self.encoder.encode(texts, **self.encode_kwargs)
        return quantize_embeddings(vectors, self.output_dtype, ranges=self.ranges)

    def _drop_bad(self, batch: Any, texts: list[Any],
                  bad: list[tuple[int, str]]) -> tuple[Any, list[str]]:
        ids = (batch.column(self.id_column).to_pylist() if self.id_column
               else [None] * len(texts))
        if self.on_bad_row == "error":
            k, why = bad[0]
            where = f"id {ids[k]!r}" if self.id_column else f"row {k} of a batch"
            raise InputError(f"{where}: {why}; fix the input or skip such rows "
                             "(--on-bad-row skip)")
        if self.skipped_dir:  # a local folder or a URI (angle_rt.embed.fs)
            name = Location.parse(self.skipped_dir).child(f"{uuid.uuid4().hex}.jsonl")
            name.write_bytes("".join(json.dumps({"id": ids[k], "reason": why}, default=str)
                                     + "\n" for k, why in bad).encode())
        drop = {k for k, _ in bad}
        keep = [k for k in range(len(texts)) if k not in drop]
        # typed indices: an empty list would be a null-typed array, which take refuses
        indices = _deps.pyarrow().array(keep, type="int64")
        return batch.take(indices), [texts[k] for k in keep]


def _row_problem(rid: Any, text: Any) -> str | None:
    """Why a row (its id as its Arrow column holds it, one type) cannot be embedded: its
    text's reason, a null id, or an id that is not valid Unicode."""
    why = bad_reason(text)
    if why is None and rid is None:
        return "null id"
    if why is None and isinstance(rid, str) and bad_reason(rid) is not None:
        return "id is not valid UTF-8"
    return why


def embed_dataset(
    ds: Any,
    bundle: str | Path,
    text_column: str = "text",
    *,
    batch_size: int = 1024,
    concurrency: int | tuple[int, int] | None = None,
    num_cpus_per_actor: float = 1,
    num_gpus_per_actor: float = 0,
    precision: str | None = None,
    layers: int | None = None,
    output_column: str = "embedding",
    output_dtype: str = "float32",
    ranges: np.ndarray | None = None,
    on_bad_row: str = "error",
    id_column: str | None = None,
    skipped_dir: str | Path | None = None,
    encode_batch_size: int = 32,
    ship_bundle: bool = False,
    udf: type = BundleEmbedder,
    **encode_kwargs: Any,
) -> Any:
    """`ds` with an `output_column` of vectors (fixed-size lists) computed from `text_column`.

    `bundle` is a path every worker node can read (shared storage, or the same path on each
    node), or, with `ship_bundle=True`, a local path sent once through the object store.
    `concurrency` is the actor count, fixed or (min, max); by default an autoscaling pool
    of 1 to one actor per `num_cpus_per_actor` CPUs (per `num_gpus_per_actor` GPUs when
    > 0) of the cluster. A fixed pool that takes every CPU starves read tasks that need a
    CPU: read with ``num_cpus=0`` (reading is I/O) or leave CPUs free.
    `batch_size` rows go to each call (they are length-sorted and batched inside it).
    `precision` and `layers` (an ESE bundle's depth variant) pick the artifact, as in
    `Encoder`. `encode_kwargs` go to `Encoder.encode` (prompt, prompt_name, normalize_embeddings,
    truncate_dim), with `encode_batch_size` as its batch_size. `output_dtype` int8/uint8
    needs `ranges` ((2, dim), e.g. `calibration_ranges` of a sample). A null or non-str text
    raises InputError (naming the `id_column` value if given), or with
    ``on_bad_row="skip"`` the row is dropped (and listed in a file under `skipped_dir`,
    a folder every worker can write to, if given). `udf` may be a BundleEmbedder subclass.
    """
    ray = _deps.need("ray", "embed_dataset")
    check_precision(output_dtype)
    if needs_ranges(output_dtype) and ranges is None:
        raise ValueError(f"output_dtype={output_dtype!r} needs ranges: pass "
                         "ranges=angle_rt.quantization.calibration_ranges(sample_vectors)")
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if Path(bundle).exists() or ship_bundle:
        read_manifest(_bundle_dir(Path(bundle)))  # a clear error here, not in every actor
    threads = max(1, int(num_cpus_per_actor))
    kwargs = {
        "output_column": output_column, "threads": threads,
        "use_gpu": num_gpus_per_actor > 0, "precision": precision, "layers": layers,
        "output_dtype": output_dtype, "on_bad_row": on_bad_row,
        "ranges": None if ranges is None else np.asarray(ranges, np.float32).tolist(),
        "encode_kwargs": {**encode_kwargs, "batch_size": encode_batch_size},
        "skipped_dir": None if skipped_dir is None else str(skipped_dir),
        "id_column": id_column,
        "shipped": [ray.put(_pack(Path(bundle)))] if ship_bundle else None,
    }
    return ds.map_batches(
        udf, fn_constructor_args=(str(bundle), text_column), fn_constructor_kwargs=kwargs,
        batch_size=batch_size, batch_format="pyarrow", zero_copy_batch=True,
        compute=_actor_pool(ray, concurrency, num_cpus_per_actor, num_gpus_per_actor),
        num_cpus=num_cpus_per_actor, num_gpus=num_gpus_per_actor or None)


def _actor_pool(ray: Any, concurrency: int | tuple[int, int] | None, cpus: float,
                gpus: float) -> Any:
    """A fixed pool of `concurrency` actors, an autoscaling (min, max) one, or by default
    (1, one actor per `cpus` CPUs, or per `gpus` GPUs when > 0, of the cluster)."""
    if concurrency is None:
        res = ray.cluster_resources()
        concurrency = (1, max(1, int(res.get("GPU", 0) // gpus if gpus > 0
                                     else res.get("CPU", 1) // cpus)))
    if isinstance(concurrency, tuple):
        return ray.data.ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1])
    return ray.data.ActorPoolStrategy(size=concurrency)


def _bundle_dir(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def _pack(bundle: Path) -> dict[str, bytes]:
    """The bundle's files (relative path → bytes) for the object store."""
    root = _bundle_dir(bundle)
    read_manifest(root)
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _unpack(ref: Any) -> str:
    """Write a shipped bundle once per node (keyed by its manifest's hash); the Encoder
    then checks every checksum against the manifest."""
    ray = _deps.need("ray", "embed_dataset")
    files = ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref
    key = hashlib.sha256(files[MANIFEST_FILE]).hexdigest()[:16]
    dest = BUNDLE_CACHE / key
    if not (dest / MANIFEST_FILE).is_file():
        BUNDLE_CACHE.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=BUNDLE_CACHE))
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        try:
            os.rename(tmp, dest)
        except OSError:  # another actor on this node won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)


def init_ray(address: str | None = None, num_cpus: int | None = None,
             progress: bool = False) -> Any:
    """Connect to the Ray cluster at `address`, or start a local one (loopback only)."""
    if address in (None, "local"):
        os.environ.setdefault(LOCAL_ONLY_ENV, "0")
    ray = _deps.need("ray", "--ray")
    _deps.need("ray.data", "--ray")
    if not progress:
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if ray.is_initialized():
        return ray
    if address in (None, "local"):
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    else:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = progress
    return ray


def embed_files_on_ray(
    bundle: str | Path,
    input: str | Path,
    output: str | Path,
    *,
    address: str | None = None,
    text_column: str = "text",
    id_column: str | None = None,
    prompt: str | None = None,
    prompt_name: str | None = None,
    normalize: bool = False,
    dimensions: int | None = None,
    precision: str | None = None,
    layers: int | None = None,
    output_dtype: str = "float32",
    output_ranges: str | Path | np.ndarray | None = None,
    compression: str | None = None,
    rows_per_file: int | None = None,
    on_bad_row: str = "error",
    overwrite: bool = False,
    chunk_size: int = 4096,
    batch_size: int = 32,
    concurrency: int | tuple[int, int] | None = None,
    num_cpus_per_actor: float = 1,
    num_gpus_per_actor: float = 0,
    num_cpus: int | None = None,
    ship_bundle: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """`angle-rt embed --ray`: INPUT (Parquet, or JSONL / CSV with `id_column`) → OUTPUT, a
    directory of Parquet files (Ray Data's layout; rows grouped by block, not in input
    order: join by id) with ``_angle_rt_embed.json``. Staged in ``OUTPUT.partial`` and
    renamed when complete; a rerun after a failure starts again. Returns the job record."""
    t0 = time.perf_counter()
    check_precision(output_dtype)
    given = given_ranges(output_ranges, output_dtype)
    codec = w.check_compression(compression or w.DEFAULT_COMPRESSION)
    output = Location.parse(output)
    if output.suffix in (".parquet", ".npy"):  # the local job's file outputs
        raise InputError(f"--ray writes a directory of Parquet files, not one {output.suffix} "
                         f"file: name OUTPUT without that suffix ({output.name!r})")
    kind = input_format(input)
    reader = open_input(input, text_column, id_column)  # columns checked here, on the driver
    if kind != "parquet" and id_column is None:
        raise InputError(f"--ray reads {kind} input only with --id-column (row numbers need "
                         "the Parquet reader); convert it to Parquet or name the id column")
    encode_kwargs = {"prompt": prompt, "prompt_name": prompt_name, "truncate_dim": dimensions,
                     "normalize_embeddings": normalize, "batch_size": batch_size}
    with Encoder(bundle, precision=precision, backend="cpu", layers=layers) as enc:
        enc.encode([""], **encode_kwargs)
        template = enc.template(prompt, prompt_name)
        dim = dimensions or enc.dim
        given_sha256 = ranges_digest(given, dim)
        ranges = given if given is not None else (
            _calibrate(enc, reader, chunk_size, encode_kwargs)
            if needs_ranges(output_dtype) else None)
        artifact, bundle_dir = enc.artifact.file, enc.bundle
    fp = {"bundle": {"manifest_sha256": sha256_file(bundle_dir / MANIFEST_FILE),
                     "artifact": artifact if num_gpus_per_actor == 0 else "gpu",
                     "layers": layers},
          "input": reader.fingerprint(), "text_column": text_column, "id_column": id_column,
          "template": template, "normalize": normalize, "dimensions": dimensions,
          "batch_size": batch_size, "output_dtype": output_dtype, "on_bad_row": on_bad_row,
          "runner": "ray", "compression": codec, "rows_per_file": rows_per_file,
          "output_ranges_sha256": given_sha256}
    if ranges is not None and given is None:  # calibrated on the first chunk: its size counts
        fp["chunk_size"] = chunk_size
    with lock_output(output):  # one run per OUTPUT, local or Ray (exit 2)
        if _prepare_dir(output, fp, overwrite):
            return json.loads(output.child(w.DIR_META).read_bytes())
        staging = output.sibling(".partial")
        skipped_dir = staging.child("_skipped")
        skipped_dir.mkdir()
        ray = init_ray(address, num_cpus, progress)
        id_name = id_column or "id"
        ds = _read(ray, reader, kind, text_column, id_column,
                   ShortCsvRows(skipped_dir.uri, on_bad_row))
        ds = embed_dataset(ds, bundle, text_column, batch_size=chunk_size,
                           concurrency=concurrency, num_cpus_per_actor=num_cpus_per_actor,
                           num_gpus_per_actor=num_gpus_per_actor, precision=precision,
                           layers=layers, output_dtype=output_dtype, ranges=ranges,
                           on_bad_row=on_bad_row, id_column=id_name,
                           skipped_dir=skipped_dir.uri, encode_batch_size=batch_size,
                           ship_bundle=ship_bundle, prompt=prompt, prompt_name=prompt_name,
                           truncate_dim=dimensions, normalize_embeddings=normalize)
        try:
            ds.select_columns([id_name, "embedding"]).write_parquet(
                staging.child("data").path, filesystem=staging.fs,
                min_rows_per_file=rows_per_file or ROWS_PER_FILE,
                ray_remote_args={"num_cpus": 0},
                **w.parquet_options(codec, id_name, output_dtype))
        except Exception as exc:  # a failed Ray run restarts from scratch: nothing staged
            staging.remove()
            bad = _input_error(exc)
            if bad is not None:  # a bad row in a worker: its message, not Ray's traceback
                raise InputError(bad) from None
            raise
        meta = {"format": RECORD_VERSION, "fingerprint": fp, "output_dtype": output_dtype,
                "dtype": quantized_dtype(output_dtype).str, "dim": dim,
                "width": quantized_width(dim, output_dtype), "id_column": id_name,
                "ranges": None if ranges is None else ranges.tolist()}
        return _finish(output, staging, meta, on_bad_row, t0,
                       _id_arrow_type(reader, kind, id_column))


def _calibrate(enc: Encoder, reader: Any, chunk_size: int,
               encode_kwargs: dict[str, Any]) -> np.ndarray:
    """int8/uint8 ranges from the first chunk's good rows, as the local job calibrates."""
    for chunk in reader.chunks(chunk_size):
        texts = [t for t in chunk.texts if bad_reason(t) is None]
        if len(texts) >= 2:
            return calibration_ranges(enc.encode(texts, **encode_kwargs))
    raise InputError("int8/uint8 output needs ≥ 2 good rows in a chunk to calibrate on")


def _input_error(exc: BaseException) -> str | None:
    """The message of the InputError behind an exception Ray raised on the driver, or None.
    A worker's error comes back wrapped (`cause`, __cause__), sometimes only as the text of
    its traceback (Ray Data's UserCodeException)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, InputError) and "Traceback" not in str(e):
            return str(e)
        found = re.findall(r"InputError: (.+)", str(e))
        if found:
            return found[-1].strip()
        csv = re.search(r"Failed to read CSV file: (\S+?)\.? Please", str(e))
        if csv:  # Ray's message for pyarrow's parse error (the row's own is not kept)
            return (f"{csv.group(1)}: a row's column count is not the header's (or the "
                    "file is not CSV); fix the input, or pass --on-bad-row skip to leave "
                    "such rows out (listed in OUTPUT.skipped.jsonl)")
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


class ShortCsvRows:
    """Bad rows met while reading for `--ray`: listed under `skipped_dir` and skipped with
    ``on_bad_row="skip"``, else the job fails naming the first. Also pyarrow's
    invalid_row_handler for CSV (a row with another column count than the header)."""

    def __init__(self, skipped_dir: str | None, on_bad_row: str) -> None:
        self.skipped_dir, self.on_bad_row = skipped_dir, on_bad_row

    def __call__(self, row: Any) -> str:
        if self.on_bad_row != "skip" or not self.skipped_dir:
            return "error"
        self.listed([{"id": None, "line": row.number, "reason": f"CSV row has "
                      f"{row.actual_columns} columns, the header {row.expected_columns}"}])
        return "skip"

    def listed(self, bad: list[dict[str, Any]]) -> None:
        """Skip (and list) these bad rows, or fail naming the first."""
        if not bad:
            return
        if self.on_bad_row != "skip":
            first = bad[0]
            where = "a row" if first["line"] is None else f"line {first['line']}"
            raise InputError(f"{where} (id {first['id']!r}): {first['reason']}; "
                             "fix the input or pass --on-bad-row skip to leave such rows out "
                             "(listed in OUTPUT.skipped.jsonl)")
        if self.skipped_dir:
            Location.parse(self.skipped_dir).child(f"{uuid.uuid4().hex}.jsonl").write_bytes(
                "".join(json.dumps(r, default=str) + "\n" for r in bad).encode())


def _read(ray: Any, reader: Any, kind: str, text_column: str, id_column: str | None,
          bad_rows: ShortCsvRows | None = None) -> Any:
    """The input as a Dataset of [id, text]: Parquet one task per row group (row numbers
    as ids without an id column), JSONL one task per ~32 MB piece parsed as the local job
    parses it, CSV Ray Data's reader with every value decoded as the local job does."""
    paths = [p.path for p in reader.files()]
    fs = reader.path.fs  # None: local; else the remote FileSystem
    if kind == "parquet":  # by row group: files may store the columns in other types
        return ray.data.from_items(_row_groups(reader)).map_batches(
            _read_row_groups, batch_size=1, batch_format="pyarrow", num_cpus=0,
            fn_kwargs={"text_column": text_column, "id_column": id_column,
                       "id_type": reader.id_type})
    # Reading is I/O: without num_cpus=0, actors holding every CPU starve the read tasks.
    if kind == "jsonl":  # parsed as the local reader parses it (Ray's reader guesses types)
        return ray.data.from_items(_jsonl_pieces(reader)).map_batches(
            _read_jsonl_pieces, batch_size=1, batch_format="pyarrow", num_cpus=0,
            fn_kwargs={"text_column": text_column, "id_column": id_column,
                       "id_type": _first_id_type(reader), "bad_rows": bad_rows})
    else:  # every CSV value a string, as the local reader has it: id "007" stays "007"
        pa, pa_csv = _deps.pyarrow(), __import__("pyarrow.csv", fromlist=["ConvertOptions"])
        types = {id_column: pa.binary(), text_column: pa.binary()}  # decoded below
        ds = ray.data.read_csv(
            paths, filesystem=fs, num_cpus=0,
            convert_options=pa_csv.ConvertOptions(column_types=types),
            parse_options=pa_csv.ParseOptions(invalid_row_handler=bad_rows,
                                              newlines_in_values=True))
        return ds.select_columns([id_column, text_column]).map_batches(
            _decode_csv, batch_format="pyarrow", num_cpus=0,
            fn_kwargs={"id_column": id_column, "text_column": text_column,
                       "bad_rows": bad_rows})
    return ds.select_columns([id_column, text_column])


def _decode_csv(batch: Any, id_column: str, text_column: str, bad_rows: ShortCsvRows) -> Any:
    """CSV values decoded as the local reader decodes them: a text or id that is not UTF-8
    makes its row a bad row, with the local job's reason (pyarrow's own decoding failed
    the whole file)."""
    pa = _deps.pyarrow()
    ids, texts, bad = [], [], []
    for raw_id, raw in zip(batch.column(id_column).to_pylist(),
                           batch.column(text_column).to_pylist(), strict=True):
        rid = None if raw_id is None else raw_id.decode("utf-8", "surrogateescape")
        text = None if raw is None else raw.decode("utf-8", "surrogateescape")
        why = bad_reason(text) or (None if rid is None or bad_reason(rid) is None
                                   else "id is not valid UTF-8")
        if why is None:
            ids.append(rid)
            texts.append(text)
        else:  # shown without its lone surrogates, which JSON cannot carry
            shown = None if raw_id is None else raw_id.decode("utf-8", "backslashreplace")
            bad.append({"id": shown, "line": None, "reason": why})
    bad_rows.listed(bad)
    return pa.table({id_column: pa.array(ids, pa.string()),
                     text_column: pa.array(texts, pa.string())})


JSONL_PIECE = 32 << 20  # bytes of JSONL one read task parses


def _jsonl_pieces(reader: Any, piece: int = JSONL_PIECE) -> list[dict[str, Any]]:
    """Each file cut at line ends into ~`piece`-byte ranges, with the number of each one's
    first line (one pass over the file, counting newlines)."""
    items = []
    for f in reader.files():
        start, pos, line, lines = 0, 0, 1, 0
        with f.open_read() as fh:
            while block := fh.read(1 << 20):
                pos += len(block)
                lines += block.count(b"\n")
                cut = block.rfind(b"\n")
                if pos - start >= piece and cut >= 0:
                    end = pos - len(block) + cut + 1
                    items.append({"path": f.uri, "start": start, "end": end, "line": line})
                    start, line, lines = end, line + lines, 0
        if pos > start:
            items.append({"path": f.uri, "start": start, "end": pos, "line": line})
    return items


def _first_id_type(reader: Any) -> str | None:
    """The id type of the input's first good row, which the local job holds every id to."""
    for chunk in reader.chunks(1024):
        for rid, text in zip(chunk.ids, chunk.texts, strict=True):
            if bad_reason(text) is None and id_problem(rid, None) is None:
                return _id_kind(rid)
    return None


def _read_jsonl_pieces(items: Any, text_column: str, id_column: str, id_type: str | None,
                       bad_rows: ShortCsvRows) -> Any:
    """[id, text] of the JSONL lines in `items`' byte ranges; a line the local job would
    skip (not JSON, not an object, a bad text, a null id or one of another type) is a bad
    row, listed with its line number or failing the job."""
    pa = _deps.pyarrow()
    ids, texts, bad = [], [], []
    for path, start, end, line in zip(*(items[c].to_pylist() for c in
                                        ("path", "start", "end", "line")), strict=True):
        with Location.parse(path).open_read() as fh:
            fh.seek(start)
            data = fh.read(end - start)
        for k, raw in enumerate(data.split(b"\n")):
            if not raw.strip():
                continue
            rid, text, why = _jsonl_row(raw, text_column, id_column)
            why = why or bad_reason(text) or id_problem(rid, id_type)
            if why is None:
                ids.append(rid)
                texts.append(text)
            else:
                bad.append({"id": rid, "line": line + k, "reason": why})
    bad_rows.listed(bad)
    return pa.table({id_column: pa.array(ids, _arrow_id(id_type)),
                     text_column: pa.array(texts, pa.string())})


def _arrow_id(id_type: str | None) -> Any:
    """The Arrow type of a JSONL id column whose first good id is of `id_type` (what the
    local job's Parquet writer infers from such ids; arrays by their values' type)."""
    pa = _deps.pyarrow()
    kinds = {"int": pa.int64(), "float": pa.float64(), "str": pa.string(), "bool": pa.bool_(),
             None: pa.string()}
    if id_type and id_type.startswith("list[") and id_type[5:-1] in kinds:
        return pa.list_(kinds[id_type[5:-1]])
    if id_type not in kinds:
        raise InputError(f"JSONL ids are {id_type} values; an id column holds ints, floats, "
                         "strings, booleans or arrays of one of them")
    return kinds[id_type]


def _jsonl_row(raw: bytes, text_column: str, id_column: str) -> tuple[Any, Any, str | None]:
    try:
        rec = json.loads(raw)
    except ValueError as exc:
        return None, None, f"not valid JSON ({exc})"
    if not isinstance(rec, dict):
        return None, None, f"a JSON {type(rec).__name__}, not an object with a text field"
    return rec.get(id_column), rec.get(text_column), None


def _row_groups(reader: Any) -> list[dict[str, Any]]:
    """One item per Parquet row group with its file and first row number."""
    pq = _deps.parquet()
    items, start = [], 0
    for f in reader.files():
        meta = pq.ParquetFile(f.parquet_source()).metadata
        for g in range(meta.num_row_groups):
            items.append({"path": f.uri, "group": g, "start": start})
            start += meta.row_group(g).num_rows
    return items


def _read_row_groups(items: Any, text_column: str, id_column: str | None = None,
                     id_type: Any = None) -> Any:
    """[id, text] of Parquet row groups: the id column (in the first file's type), or row
    numbers; texts as plain strings whether a file stores them as string, large_string or
    dictionary (Ray's reader could not merge such files' schemas)."""
    pa, pq, pc = _deps.pyarrow(), _deps.parquet(), __import__("pyarrow.compute").compute
    tables = []
    for path, group, start in zip(items["path"].to_pylist(), items["group"].to_pylist(),
                                  items["start"].to_pylist(), strict=True):
        source = Location.parse(path).parquet_source()
        cols = [text_column] + ([id_column] if id_column else [])
        part = pq.ParquetFile(source).read_row_group(group, columns=cols)
        texts = pc.cast(_plain(part.column(0)), pa.string())
        ids = (pc.cast(_plain(part.column(1)), _plain_type(id_type)) if id_column else
               pa.array(np.arange(start, start + len(texts), dtype=np.int64)))
        tables.append(pa.table({id_column or "id": ids, text_column: texts}))
    return pa.concat_tables(tables)


def _plain(column: Any) -> Any:
    """A dictionary-encoded column decoded to its values."""
    pa = _deps.pyarrow()
    if pa.types.is_dictionary(column.type):
        return pa.chunked_array([c.dictionary_decode() for c in column.chunks],
                                column.type.value_type)
    return column


def _plain_type(kind: Any) -> Any:
    pa = _deps.pyarrow()
    return kind.value_type if pa.types.is_dictionary(kind) else kind


def _prepare_dir(output: Location, fp: dict[str, Any], overwrite: bool) -> bool:
    """True if OUTPUT is this job's complete output; clears what the job may replace."""
    if output.exists():
        record = output.child(w.DIR_META)
        done = json.loads(record.read_bytes()) if record.is_file() else None
        if done is not None and done.get("fingerprint") == fp:
            return True
        if not overwrite:
            why = (f"was written with other arguments (differs in: "
                   f"{', '.join(differences(done.get('fingerprint', {}), fp))})"
                   if done else "was not written by `angle-rt embed --ray`")
            raise OutputExistsError(f"{output} {why}; pass --overwrite to replace it")
        if done is None and output.files():
            raise OutputExistsError(f"{output} holds files not written by `angle-rt embed`; "
                                    "not replacing it even with --overwrite: remove it "
                                    "yourself or choose another OUTPUT")
        output.remove()
    output.sibling(".skipped.jsonl").remove()
    output.sibling(".partial").remove()  # a failed Ray run restarts from scratch
    return False


def _id_arrow_type(reader: Any, kind: str, id_column: str | None) -> Any:
    """The output's id column type (for an output of no rows)."""
    pa = _deps.pyarrow()
    if kind == "parquet":
        return _plain_type(reader.id_type) if id_column else pa.int64()
    return _arrow_id(_first_id_type(reader)) if kind == "jsonl" else pa.string()


def _finish(output: Location, staging: Location, meta: dict[str, Any], on_bad_row: str,
            t0: float, id_type: Any) -> dict[str, Any]:
    pa, pq = _deps.pyarrow(), _deps.parquet()
    data = staging.child("data")
    files = [f for f in data.files() if f.name.endswith(".parquet")]
    if not files:  # Ray writes no file for no rows; an empty dataset still reads
        empty = np.zeros((0, meta["width"]), dtype=np.dtype(meta["dtype"]))
        table = pa.table({meta["id_column"]: pa.array([], id_type),
                          "embedding": w.vector_column(empty, meta["output_dtype"])})
        data.mkdir()
        part = data.child("part-000000.parquet")
        with part.open_write() as fh:
            pq.write_table(table, fh)
        part.commit_write()
        files = [part]
    meta["rows"] = sum(pq.ParquetFile(f.parquet_source()).metadata.num_rows for f in files)
    skipped = _collect_skipped(staging.child("_skipped"))
    meta["skipped"] = len(skipped)
    if on_bad_row == "skip":
        output.sibling(".skipped.jsonl").write_bytes("".join(
            json.dumps(r, default=str) + "\n" for r in skipped).encode())
    record = json.dumps(meta, indent=1).encode()
    if output.local:  # one rename: OUTPUT is absent or complete
        data.child(w.DIR_META).write_bytes(record)
        os.replace(data.path, output.path)
    else:  # no directory rename on a store: complete once its record is there
        output.mkdir()
        for f in files:
            f.copy_to(output.child(f.name))
        output.child(w.DIR_META).write_bytes(record)
    staging.remove()
    meta["seconds"] = time.perf_counter() - t0
    return meta


def _collect_skipped(folder: Location) -> list[dict[str, Any]]:
    """Skipped rows the actors listed, once each (a retried task lists its rows again)."""
    seen: dict[str, dict[str, Any]] = {}
    for f in folder.files():
        for line in f.read_bytes().decode().splitlines():
            rec = json.loads(line)
            seen[json.dumps([rec["id"], rec.get("line")], default=str)] = rec
    return sorted(seen.values(), key=_skipped_order)


def _skipped_order(rec: dict[str, Any]) -> tuple[str, Any, int]:
    """Ids of one type in their order (row numbers numerically: input order, as the local
    job lists them; as strings they sorted 1500 before 3), then by line."""
    rid = rec["id"]
    numeric = isinstance(rid, (int, float)) and not isinstance(rid, bool)
    return type(rid).__name__, rid if numeric else str(rid), rec.get("line") or 0
