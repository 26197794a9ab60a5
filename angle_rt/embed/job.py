"""The file job: read chunks → check rows → encode → quantize → stage → record progress.

Resume: after each chunk, the writer makes its rows durable, then ``state.json`` records
rows read, rows written and parts staged (written to a temporary file and renamed). A run
killed at any point leaves the state of the last recorded chunk; a rerun with the same
arguments cuts staged data back to it and goes on from the next input row, so the output
holds each id once, in input order, identical to an uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from angle_rt.embed import writers as w
from angle_rt.embed.errors import InputError, OutputExistsError
from angle_rt.embed.fs import Location
from angle_rt.embed.outputs import open_writer
from angle_rt.embed.readers import BadRow, Chunk, Reader, bad_reason, open_input
from angle_rt.encoder import Encoder
from angle_rt.manifest import MANIFEST_FILE, sha256_file
from angle_rt.quantization import (
    calibration_ranges,
    check_precision,
    needs_ranges,
    quantize_embeddings,
    quantized_dtype,
    quantized_width,
    read_ranges,
)

RECORD_VERSION = 1
ON_BAD_ROW = ("error", "skip")
DEFAULT_CHUNK_SIZE = 4096


@dataclass
class EmbedResult:
    """What a job did: rows written and skipped, where, and how fast."""

    output: Path | Location  # Location: a remote output
    rows: int
    skipped: int
    dim: int
    output_dtype: str
    seconds: float
    resumed_from: int = 0  # input rows already done when this run started
    complete_before: bool = False  # OUTPUT was already complete: nothing to do
    side_files: list[Any] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Rows read per second by this run."""
        done = self.rows + self.skipped - self.resumed_from
        return done / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Job:
    reader: Reader
    writer: w.Writer
    encoder: Encoder
    encode_kwargs: dict[str, Any]
    output_dtype: str
    on_bad_row: str
    chunk_size: int
    meta: dict[str, Any]
    state: dict[str, Any]


def embed_file(
    bundle: str | Path | Encoder,
    input: str | Path,
    output: str | Path,
    *,
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
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    batch_size: int = 32,
    intra_op_threads: int | None = None,
    backend: str = "auto",
    progress: bool = False,
) -> EmbedResult:
    """Embed the texts of INPUT (.parquet / directory of Parquet, .jsonl, .csv, .txt) into
    OUTPUT (.parquet, .npy, or a directory of Parquet parts), resuming an interrupted run.

    `bundle` is a bundle path (opened with `precision`, `backend`, `intra_op_threads` and
    `layers`, an ESE bundle's depth variant) or an open Encoder. Ids are `id_column`'s
    values, or row numbers. `output_dtype` quantizes as
    `angle_rt.quantization.quantize_embeddings`: int8/uint8 ranges from `output_ranges` (a
    (2, dim) array, or a file `read_ranges` takes: `angle-rt calibrate`'s .npy, a job
    record), else from the first chunk. `compression`: the Parquet codec (default zstd).
    `rows_per_file`: a directory output regrouped into files of that many rows at the end
    (default: one file per chunk).
    A bad row (null or non-str text, null id) raises InputError naming it, or with
    ``on_bad_row="skip"`` is left out and listed in ``OUTPUT.skipped.jsonl``.
    """
    check_precision(output_dtype)
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 2:
        raise ValueError(f"chunk_size must be an int ≥ 2, got {chunk_size!r}")
    if id_column == w.EMBEDDING:
        raise ValueError(f"--id-column {w.EMBEDDING!r} would clash with the output's "
                         "vector column; rename it")
    ranges = given_ranges(output_ranges, output_dtype)
    reader = open_input(input, text_column, id_column)
    writer = open_writer(output, id_column or "id", getattr(reader, "id_type", None),
                           compression, rows_per_file)
    own = not isinstance(bundle, Encoder)
    enc = Encoder(bundle, precision=precision, backend=backend,
                  intra_op_threads=intra_op_threads, layers=layers) if own else bundle
    try:
        kwargs = {"batch_size": batch_size, "prompt": prompt, "prompt_name": prompt_name,
                  "normalize_embeddings": normalize, "truncate_dim": dimensions}
        probe = enc.encode([""], **kwargs)  # bad prompt / dimensions: before touching OUTPUT
        fp = fingerprint(enc, reader, kwargs, output_dtype, on_bad_row, chunk_size,
                         id_column)
        fp.update(compression=writer.compression, rows_per_file=rows_per_file,
                  output_ranges_sha256=ranges_digest(ranges, probe.shape[1]))
        with writer.lock():  # a second run on OUTPUT refuses (exit 2)
            return _run(reader, writer, enc, kwargs, fp, output_dtype, on_bad_row,
                        chunk_size, overwrite, progress, ranges)
    finally:
        if own:
            enc.close()


def given_ranges(output_ranges: str | Path | np.ndarray | None,
                 output_dtype: str) -> np.ndarray | None:
    """int8/uint8 ranges passed in (array or file), checked against the output dtype."""
    if output_ranges is None:
        return None
    if not needs_ranges(output_dtype):
        raise ValueError(f"--output-ranges applies to int8/uint8 output, not {output_dtype}")
    if isinstance(output_ranges, np.ndarray):
        ranges = np.asarray(output_ranges, dtype=np.float32)
        if ranges.ndim != 2 or ranges.shape[0] != 2:
            raise ValueError(f"ranges must be a (2, dim) array, got shape {ranges.shape}")
        return ranges
    return read_ranges(output_ranges)


def ranges_digest(ranges: np.ndarray | None, width: int) -> str | None:
    """The sha256 of ranges passed in, for the fingerprint (None: none passed);
    ValueError if they are not for `width`-d vectors."""
    if ranges is None:
        return None
    if ranges.shape[1] != width:
        raise ValueError(f"--output-ranges holds {ranges.shape[1]}-d ranges; this job "
                         f"writes {width}-d vectors")
    return hashlib.sha256(ranges.tobytes()).hexdigest()


def fingerprint(enc: Encoder, reader: Reader, kwargs: dict[str, Any], output_dtype: str,
                on_bad_row: str, chunk_size: int, id_column: str | None) -> dict[str, Any]:
    """Everything that decides the output's bytes: a rerun must match it to resume."""
    return {
        "bundle": {"manifest_sha256": sha256_file(enc.bundle / MANIFEST_FILE),
                   "artifact": enc.artifact.file, "backend": enc.session.name,
                   "max_batch_tokens": enc.max_batch_tokens},
        "input": reader.fingerprint(),
        "text_column": reader.text_column if reader.kind != "txt" else None,
        "id_column": id_column,
        "template": enc.template(kwargs["prompt"], kwargs["prompt_name"]),
        "normalize": bool(kwargs["normalize_embeddings"]),
        "dimensions": kwargs["truncate_dim"],
        "batch_size": kwargs["batch_size"],
        "output_dtype": output_dtype,
        "on_bad_row": on_bad_row,
        "chunk_size": chunk_size,
    }


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two fingerprints."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def _run(reader: Reader, writer: w.Writer, enc: Encoder, kwargs: dict[str, Any],
         fp: dict[str, Any], output_dtype: str, on_bad_row: str, chunk_size: int,
         overwrite: bool, progress: bool, ranges: np.ndarray | None) -> EmbedResult:
    t0 = time.perf_counter()
    state = _prepare(writer, fp, overwrite)
    if state is not None and ranges is not None:  # one code book for every shard
        state["ranges"] = ranges.tolist()
    dim = kwargs["truncate_dim"] or enc.dim
    meta = {"format": RECORD_VERSION, "fingerprint": fp, "output_dtype": output_dtype,
            "dtype": quantized_dtype(output_dtype).str, "dim": dim,
            "width": quantized_width(dim, output_dtype), "id_column": writer.id_name,
            "model": enc.manifest.source.get("model"),
            "ranges": None}
    if state is None:  # complete already
        done = writer.final_meta() or {}
        staged = writer.load_state()
        if staged is not None and staged.get("fingerprint") == fp:
            # killed after publishing, before tidying up: its skipped list goes beside
            # OUTPUT; another run's staging (other arguments) is that run's to resume
            writer.finish_side_files(on_bad_row == "skip")
        return EmbedResult(writer.output, done.get("rows", 0), done.get("skipped", 0), dim,
                           output_dtype, time.perf_counter() - t0, complete_before=True,
                           side_files=writer.present_side_files())
    meta["ranges"] = state["ranges"]  # calibrated already when resuming
    job = _Job(reader, writer, enc, kwargs, output_dtype, on_bad_row, chunk_size, meta, state)
    resumed = state["rows_read"]
    try:
        _loop(job, progress)
    except InputError:
        # nothing staged can be resumed: fixing the input or skipping bad rows are other
        # arguments, which the staging would refuse
        writer.clear_staging()
        raise
    meta.update(ranges=state["ranges"], rows=state["rows_written"], skipped=state["skipped"])
    if state.get("replaces"):  # --overwrite: the old output goes only now
        writer.remove_final()
        # recorded before publishing: a run killed while moving files into place resumes
        # the moves, and must not remove what it already moved
        state["replaces"] = False
        writer.save_state(state)
    writer.finalize(meta)
    writer.finish_side_files(on_bad_row == "skip")
    return EmbedResult(writer.output, state["rows_written"], state["skipped"], dim,
                       output_dtype, time.perf_counter() - t0, resumed_from=resumed,
                       side_files=writer.present_side_files())


def _prepare(writer: w.Writer, fp: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The state to continue from (fresh or resumed), or None if OUTPUT is already this
    job's complete output. Refuses another job's OUTPUT or staging without `overwrite`."""
    staged = writer.load_state()
    if staged is not None and staged.get("fingerprint") == fp:
        if _published(writer, fp):  # killed while removing the staging of a finished run
            return None
        writer.resume(staged["rows_written"], staged["parts"], staged["writer"])
        writer.cut_skipped(staged)
        return staged
    try:
        done = writer.final_meta()
    except OutputExistsError:  # not written by this job runner
        if not overwrite:
            raise
        done = None
    if done is not None and done.get("fingerprint") == fp:
        return None
    if not overwrite:
        if staged is not None or writer.staging_busy():
            diff = differences(staged.get("fingerprint", {}), fp) if staged else ["unknown"]
            raise OutputExistsError(
                f"{writer.staging} holds an interrupted run with other arguments (differs "
                f"in: {', '.join(diff)}); rerun with those arguments to resume it, or pass "
                "--overwrite to discard it")
        if done is not None:
            diff = differences(done.get("fingerprint", {}), fp)
            raise OutputExistsError(
                f"{writer.output} was written with other arguments (differs in: "
                f"{', '.join(diff)}); pass --overwrite to replace it")
    writer.clear_staging()
    replaces = _old_output_present(writer)  # kept until the new output is complete
    writer.start_staging(fp["on_bad_row"] == "skip")
    state = {"fingerprint": fp, "rows_read": 0, "rows_written": 0, "parts": 0, "skipped": 0,
             "skipped_bytes": 0, "ranges": None, "writer": {}, "replaces": replaces}
    writer.save_state(state)
    return state


def _published(writer: w.Writer, fp: dict[str, Any]) -> bool:
    """Whether OUTPUT is this job's complete output (its record names this fingerprint)."""
    try:
        done = writer.final_meta()
    except OutputExistsError:
        return False
    return done is not None and done.get("fingerprint") == fp


def _old_output_present(writer: w.Writer) -> bool:
    """Whether OUTPUT or its side files exist (to be replaced when the new output is
    complete); refuses a folder that `angle-rt embed` did not write, even with overwrite."""
    writer.check_replaceable()
    return writer.output_present()


def _loop(job: _Job, progress: bool) -> None:
    state, enc = job.state, job.encoder
    bar = _bar(progress, job.reader, state["rows_read"])
    try:
        for chunk in job.reader.chunks(job.chunk_size, state["rows_read"]):
            ids, texts, skipped = _check_rows(chunk, job.on_bad_row, state)
            if ids:
                vectors = enc.encode(texts, **job.encode_kwargs)
                if needs_ranges(job.output_dtype) and state["ranges"] is None:
                    state["ranges"] = job.meta["ranges"] = _calibrate(vectors, chunk)
                out = quantize_embeddings(vectors, job.output_dtype, ranges=_ranges(state))
                state["writer"] = job.writer.write(ids, out, job.meta) or state["writer"]
                state["parts"] += 1
            if skipped:
                job.writer.append_skipped(skipped, state)
            state["rows_read"] = chunk.start + len(chunk.texts)
            state["rows_written"] += len(ids)
            state["skipped"] += len(skipped)
            job.writer.save_state(state)
            bar.update(len(chunk.texts))
    finally:
        bar.close()


def _check_rows(chunk: Chunk, on_bad_row: str,
                state: dict[str, Any]) -> tuple[list[Any], list[str], list[dict]]:
    """(ids, texts) of the good rows, and a record per bad row; InputError on the first bad
    row unless skipping. Ids keep the type of the first good row's (`state["id_type"]`,
    kept across resumes): an id of another type (JSONL `7` after `"a"`) is a bad row, in
    every output format, rather than a Parquet write failing mid-job."""
    ids, texts, skipped = [], [], []
    for k, (rid, text) in enumerate(zip(chunk.ids, chunk.texts, strict=True)):
        why = bad_reason(text) if isinstance(text, BadRow) or rid is not None else "null id"
        if why is None:
            why = id_problem(rid, state.get("id_type"))
        if why is None:
            state.setdefault("id_type", _id_kind(rid))  # the first good id's
            ids.append(rid)
            texts.append(text)
            continue
        row = chunk.start + k
        if on_bad_row == "error":
            raise InputError(f"row {row} (id {rid!r}): {why}; fix the input or pass "
                             "--on-bad-row skip to leave such rows out (listed in "
                             "OUTPUT.skipped.jsonl)")
        skipped.append({"row": row, "id": rid, "reason": why})
    return ids, texts, skipped


def id_problem(rid: Any, id_type: str | None) -> str | None:
    """Why `rid` cannot be a row's id when the ids before it are of `id_type` (None: no id
    before it), or None."""
    if rid is None:
        return "null id"
    why = _value_problem(rid)
    kind = _id_kind(rid)
    if why is None and id_type not in (None, kind, _LEGACY.get(kind)):
        why = f"id is {kind}, but the ids before it are {id_type}"
    return why


# a job record written before arrays were typed by their values holds "list"
_LEGACY = {f"list[{k}]": "list" for k in ("int", "float", "str", "bool")}


def _value_problem(rid: Any, inside: bool = False) -> str | None:
    """What no output can store as this id: Parquet fixes a struct's keys and a list's
    element type at the first chunk, so later ones would be lost or fail the write."""
    if isinstance(rid, dict):
        return "id is a JSON object; ids are strings, numbers or arrays of one of them"
    if isinstance(rid, list):
        if inside:
            return "id is an array of arrays; ids are strings, numbers or arrays of one of them"
        kinds = {_id_kind(x) for x in rid if x is not None}
        if len(kinds) > 1:
            return f"id is an array of mixed types ({', '.join(sorted(kinds))})"
        if not kinds:
            return "id is an array without values"
        return next(filter(None, (_value_problem(x, True) for x in rid)), None)
    if isinstance(rid, int) and not isinstance(rid, bool) and not -2**63 <= rid < 2**63:
        return "id is an integer past int64 (what an id column stores)"
    if isinstance(rid, str) and bad_reason(rid) is not None:  # a lone surrogate (JSON \ud800)
        return "id is not valid Unicode (lone surrogate)"
    return None


def _id_kind(rid: Any) -> str:
    """An id's type as the output stores it: int and str stay apart, bool is not an int;
    an array by its values' type (`list[int]`)."""
    if isinstance(rid, list):
        kinds = sorted({_id_kind(x) for x in rid if x is not None})
        return f"list[{'|'.join(kinds)}]"
    return "int" if isinstance(rid, int) and not isinstance(rid, bool) else type(rid).__name__


def _ranges(state: dict[str, Any]) -> np.ndarray | None:
    return None if state["ranges"] is None else np.asarray(state["ranges"], dtype=np.float32)


def _calibrate(vectors: np.ndarray, chunk: Chunk) -> list[list[float]]:
    if len(vectors) < 2:
        raise InputError(f"int8/uint8 output calibrates its ranges on the first chunk with "
                         f"rows to embed, which (from row {chunk.start}) has only one; use "
                         "a larger --chunk-size")
    return calibration_ranges(vectors).tolist()


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(enabled: bool, reader: Reader, initial: int) -> Any:
    """A tqdm bar over rows (sent/s, ETA) when asked for and tqdm is installed."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        print("angle-rt embed: install tqdm for a progress bar", file=sys.stderr)
        return _NoBar()
    return tqdm(total=reader.count_rows(), initial=initial, desc="embed", unit="sent",
                unit_scale=True, smoothing=0.1, dynamic_ncols=True)
