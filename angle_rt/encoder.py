"""The façade: text in, the exported model's vectors out."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from angle_rt._system import physical_cores
from angle_rt.batching import pad_batch, plan_batches
from angle_rt.errors import BundleError, ClosedError
from angle_rt.manifest import (
    MANIFEST_FILE,
    Manifest,
    min_tokens,
    read_manifest,
    verify_checksum,
)
from angle_rt.postprocess import l2_normalize, truncate_dims
from angle_rt.prompts import PROMPTS, resolve_prompt
from angle_rt.session import Session, open_session, select
from angle_rt.tokenizer import TextTokenizer

DEFAULT_MAX_BATCH_TOKENS = 16384


class Encoder:
    """Encodes sentences with an angle_rt bundle.

    `path` is the bundle directory or a file inside it (an artifact or angle_rt.json).
    `precision` picks an artifact ("fp32", "fp16", "int8", …) when `path` is a directory;
    by default the best one present for the device (angle_rt.session.PREFERENCE);
    `backend` is "auto" (TensorRT engine → ONNX Runtime CUDA → CPU), "tensorrt",
    "cuda", "cpu", or a loader taking the artifact path and returning a Session.
    `max_batch_tokens` bounds padded tokens per batch. `layers` picks a depth variant of an
    ESE bundle (the backbone cut after that many layers; `variants()` lists them).
    `ort_config` adds ONNX Runtime session config entries, e.g.
    ``{"session.intra_op.allow_spinning": "0"}`` (what `angle-rt serve` uses: idle threads
    sleep instead of spinning, leaving the cores to the event loop).
    `streams` is how many batches `encode` runs at once on the CPU backend. By default
    (neither `streams` nor `intra_op_threads` given) one batch per physical core, each on
    one ONNX Runtime thread: for embedding models' small GEMMs that runs 1.4-1.5x the
    sentences of one batch at a time on every core, and a lone short text is answered
    faster too (docs/benchmarks.md). With `intra_op_threads` alone, one batch at a time on
    that many threads (as before). The vectors are the same either way.

    `close()` (or leaving a ``with Encoder(...) as enc:`` block) waits for running encodes,
    then releases the session (ONNX Runtime session; TensorRT contexts, device and pinned
    buffers, streams); using a closed Encoder raises ClosedError.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        precision: str | None = None,
        backend: str | Callable[[Path], Session] = "auto",
        intra_op_threads: int | None = None,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        verify_checksums: bool = True,
        layers: int | None = None,
        ort_config: Mapping[str, str] | None = None,
        streams: int | None = None,
    ) -> None:
        max_batch_tokens = _positive_int("max_batch_tokens", max_batch_tokens)
        self.bundle, file = locate_bundle(Path(path))
        self.manifest: Manifest = read_manifest(self.bundle)
        depth = self.manifest if file is not None else self.manifest.at_depth(layers)
        self.artifact, device = select(depth, file, precision, backend)
        if file is not None and layers is not None and self.artifact.layers != layers:
            raise ValueError(f"{file} is cut at {self.artifact.layers or 'no'} layers, not the "
                             f"requested {layers}")
        tok_file = self.manifest.tokenizer["file"]
        if verify_checksums:
            verify_checksum(self.bundle, tok_file, self.manifest.tokenizer["sha256"])
            verify_checksum(self.bundle, self.artifact.file, self.artifact.sha256)
            for extra in self.artifact.external_data:
                verify_checksum(self.bundle, extra["file"], extra["sha256"])
        self.tokenizer = _open_tokenizer(self.bundle / tok_file, self.manifest)
        self._state = threading.Condition()
        self._running, self._closed = 0, False
        intra_op_threads, self.streams = _parallelism(device, intra_op_threads, streams)
        self.threads = intra_op_threads  # ONNX Runtime threads a batch (None: its default)
        self._pool: ThreadPoolExecutor | None = None
        self.session = open_session(self.bundle / self.artifact.file, device,
                                    self.manifest.embedding_dim, intra_op_threads,
                                    ort_config)
        self.max_batch_tokens = max_batch_tokens
        self.prompts = {**PROMPTS, **self.manifest.prompts}
        self._min_tokens = min_tokens(self.manifest.pooling)

    @property
    def dim(self) -> int:
        """Embedding width."""
        return self.manifest.embedding_dim

    @property
    def max_length(self) -> int:
        """Tokens per text (prompt included) beyond which text is truncated."""
        return self.manifest.max_length

    def encode(
        self,
        sentences: str | Sequence[str],
        batch_size: int = 32,
        prompt: str | None = None,
        prompt_name: str | None = None,
        normalize_embeddings: bool = False,
        truncate_dim: int | None = None,
        show_progress_bar: bool = False,
        convert_to_numpy: bool = True,
    ) -> np.ndarray | list[np.ndarray]:
        """Embed sentences, keyword-compatible with sentence-transformers' `encode`.

        A str gives a 1-D vector, a list an (n, dim) float32 array in input order.
        `prompt` is a template with ``{text}``, a prefix, or a prompt name (A, B, C or
        one the bundle defines); None uses the bundle's default prompt, "" none.
        """
        single = isinstance(sentences, str)
        texts = [sentences] if single else _as_texts(sentences)
        template = self.template(prompt, prompt_name)
        with self._open_for_use():
            emb = self._embed(texts, template, batch_size, show_progress_bar)
        emb = truncate_dims(emb, truncate_dim)
        if normalize_embeddings:
            emb = l2_normalize(emb)
        if single:
            return emb[0]
        return emb if convert_to_numpy else list(emb)

    def encode_iter(
        self,
        sentences: Iterable[str],
        chunk_size: int = 4096,
        show_progress_bar: bool = False,
        **encode_kwargs: Any,
    ) -> Iterator[np.ndarray]:
        """Yield (k, dim) arrays for consecutive chunks of any iterable, in input order.

        Memory stays bounded by `chunk_size` however long the stream; a non-str item
        raises TypeError naming its position in the whole stream.
        """
        if isinstance(sentences, str):
            raise TypeError("encode_iter takes an iterable of str; use encode() for one text")
        _check_container(sentences)
        chunk_size = _positive_int("chunk_size", chunk_size)
        bar = _bar(show_progress_bar, None)
        chunk: list[str] = []
        for i, text in enumerate(sentences):
            if not isinstance(text, str):
                raise TypeError(f"sentences[{i}] is {type(text).__name__}, not str")
            chunk.append(text)
            if len(chunk) == chunk_size:
                yield self._encode_chunk(chunk, i + 1 - len(chunk), encode_kwargs)
                bar.update(len(chunk))
                chunk = []
        if chunk:
            yield self._encode_chunk(chunk, i + 1 - len(chunk), encode_kwargs)
            bar.update(len(chunk))
        bar.close()

    def _encode_chunk(self, chunk: list[str], start: int,
                      encode_kwargs: dict[str, Any]) -> np.ndarray:
        """`encode(chunk)`; an error naming `sentences[k]` names the item in the stream."""
        try:
            return self.encode(chunk, **encode_kwargs)
        except ValueError as exc:
            message = _ITEM.sub(lambda m: f"sentences[{int(m.group(1)) + start}]", str(exc))
            if message == str(exc):
                raise
            raise ValueError(message) from exc

    def template(self, prompt: str | None = None,
                 prompt_name: str | None = None) -> str | None:
        """The prompt template `encode` applies for these arguments (None: no prompt)."""
        if prompt is not None and prompt_name is not None:
            raise ValueError(f"give prompt ({prompt!r}) or prompt_name ({prompt_name!r}), not "
                             "both")
        if prompt_name is not None:
            if prompt_name not in self.prompts:
                raise ValueError(f"unknown prompt_name {prompt_name!r}; this bundle has "
                                 f"{', '.join(sorted(self.prompts))}")
            return self.prompts[prompt_name]
        if prompt is None:
            return self.manifest.default_prompt
        return resolve_prompt(prompt, self.prompts)

    def tokenize(self, texts: list[str], template: str | None) -> list[list[int]]:
        """Token ids per text, prompt applied and truncated at max_length, exactly as
        `encode` feeds them; ValueError names a text too short for the bundle's pooling."""
        ids = self.tokenizer.encode(texts, template)
        _check_lengths(ids, self._min_tokens)
        return ids

    @property
    def pad_width_cap(self) -> int:
        """Widest padded batch: never past max_length (position embeddings) or the
        backend's widest input (a TensorRT engine's largest profile)."""
        return min(self.max_length, self.session.max_width or self.max_length)

    def plan(self, lengths: list[int], batch_size: int) -> list[np.ndarray]:
        """Index batches for token rows of these lengths under the Encoder's token budget,
        padded as the backend wants (what `encode` runs)."""
        return plan_batches(lengths, batch_size, self.max_batch_tokens,
                            self.session.pad_multiple, self.pad_width_cap,
                            getattr(self.session, "batch_cost", 0))

    def run_batch(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """Vectors (len(rows), dim) for one batch of token id rows: padded, then run by the
        backend. Raw model output: `encode`'s truncate_dim / normalize come after."""
        with self._open_for_use():
            return self._run_rows(rows)

    def _run_rows(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        sess = self.session
        input_ids, mask = pad_batch(rows, self.manifest.pad_token_id,
                                    self.manifest.padding_side, sess.pad_multiple,
                                    sess.input_dtype, self.pad_width_cap)
        return sess.run(input_ids, mask)

    def _embed(self, texts: list[str], template: str | None, batch_size: int,
               progress: bool) -> np.ndarray:
        batch_size = _positive_int("batch_size", batch_size)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        ids = self.tokenize(texts, template)
        batches = self.plan([len(r) for r in ids], batch_size)
        if self.streams > 1 and len(batches) > 1:
            self._run_streams(ids, batches, out, progress)
            return out
        for idx in _progress(batches, progress, len(texts)):
            out[idx] = self._run_rows([ids[i] for i in idx])
        return out

    def _run_streams(self, ids: list[list[int]], batches: list[np.ndarray], out: np.ndarray,
                     progress: bool) -> None:
        """Run the batches `streams` at a time (ONNX Runtime's run() is thread-safe and
        releases the GIL); each writes its own rows of `out`."""
        def run(idx: np.ndarray) -> int:
            out[idx] = self._run_rows([ids[i] for i in idx])
            return len(idx)

        pool = self._executor()
        futures = [pool.submit(run, idx) for idx in batches]
        bar = _bar(progress, len(out))
        try:
            for fut in as_completed(futures):
                bar.update(fut.result())
        finally:  # on an error, drop what has not started and wait for what has
            for fut in futures:
                fut.cancel()
            wait(futures)
            bar.close()

    def _executor(self) -> ThreadPoolExecutor:
        with self._state:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.streams, thread_name_prefix="angle_rt")
            return self._pool

    def variants(self) -> list[dict[str, Any]]:
        """Every artifact of the bundle as depth × precision, with what its export measured:
        parity (min cosine), STS-B dev Spearman per dimension and sentences/s where recorded.
        The depth is None for the full model; `weights` is "distilled" for a depth variant
        trained on its own (training.depth), "shared" for a cut of the full model."""
        rows = []
        for art in self.manifest.artifacts:
            parity = art.parity or {}
            rows.append({"layers": art.layers, "precision": art.precision, "file": art.file,
                         "format": art.format, "min_cosine": parity.get("min_cosine"),
                         "stsb_dev_by_dim": parity.get("stsb_dev_by_dim", {}),
                         "sentences_per_s": parity.get("sentences_per_s"),
                         "weights": (art.depth_source or {}).get("kind", "shared")})
        return sorted(rows, key=lambda r: (r["layers"] is None, r["layers"] or 0,
                                           r["precision"]))

    def close(self) -> None:
        """Wait for running encodes, then release the backend; safe to call twice."""
        with self._state:
            if self._closed:
                return
            self._closed = True
            self._state.wait_for(lambda: self._running == 0)
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown()
        self.session.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Encoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _open_for_use(self) -> Iterator[None]:
        with self._state:
            if self._closed:
                raise ClosedError(f"this Encoder ({self.bundle}) was closed; open a new one")
            self._running += 1
        try:
            yield
        finally:
            with self._state:
                self._running -= 1
                self._state.notify_all()

    def __repr__(self) -> str:
        return (f"Encoder({str(self.bundle)!r}, artifact={self.artifact.file!r}, "
                f"backend={self.session.name!r}, dim={self.dim}, streams={self.streams})")


def _parallelism(device: object, intra_op_threads: int | None,
                 streams: int | None) -> tuple[int | None, int]:
    """(ONNX Runtime threads a run, batches at once) for `encode`."""
    for name, value in (("streams", streams), ("intra_op_threads", intra_op_threads)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    if device != "cpu":  # GPUs queue on one stream; a loader's session: one unless asked
        if streams not in (None, 1) and not callable(device):
            raise ValueError(f"streams={streams} runs CPU batches side by side; this Encoder "
                             f"runs on {device}: leave streams at 1")
        return intra_op_threads, streams or 1
    if streams is None:
        streams = physical_cores() if intra_op_threads is None else 1
    return intra_op_threads or max(1, physical_cores() // streams), streams


def locate_bundle(path: Path) -> tuple[Path, str | None]:
    """The bundle directory of `path` (a bundle or a file inside one) and the artifact
    file it names, if any; BundleError when it does not exist."""
    if path.is_dir():
        return path, None
    if path.is_file():
        return path.parent, None if path.name == MANIFEST_FILE else path.name
    raise BundleError(f"{path} does not exist; pass a bundle directory written by angle-export "
                      "or a file inside one")


def _open_tokenizer(path: Path, manifest: Manifest) -> TextTokenizer:
    try:
        return TextTokenizer(path, manifest.max_length)
    except Exception as exc:  # the Rust tokenizer raises bare Exceptions on bad JSON
        raise BundleError(f"{path} is not a valid tokenizer.json ({exc}); re-export") from exc


_ITEM = re.compile(r"sentences\[(\d+)\]")


def _positive_int(name: str, value: object) -> int:
    """`value` as an int ≥ 1 (a numpy integer too); ValueError naming `name` otherwise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _as_texts(sentences: object) -> list[str]:
    """A list of str from a list, tuple, 1-D array or any other iterable of str."""
    if isinstance(sentences, np.ndarray):
        if sentences.ndim != 1:
            raise TypeError(f"sentences array must be 1-D, got shape {sentences.shape}")
        sentences = sentences.tolist()
    _check_container(sentences)
    texts = sentences if isinstance(sentences, list) else list(sentences)
    for i, s in enumerate(texts):
        if not isinstance(s, str):
            raise TypeError(f"sentences[{i}] is {type(s).__name__}, not str")
    return texts


def _check_container(sentences: object) -> None:
    """Refuse what iterates over something other than texts: a DataFrame (its column
    labels), a dict (its keys), bytes (ints)."""
    if hasattr(sentences, "columns"):
        raise TypeError(f"sentences is a {type(sentences).__name__}: pass one column of it "
                        "(df['text'])")
    if isinstance(sentences, (bytes, bytearray, Mapping)) or not isinstance(sentences,
                                                                             Iterable):
        raise TypeError("sentences must be a str or an iterable of str, got "
                        f"{type(sentences).__name__}")


def _check_lengths(ids: list[list[int]], need: int) -> None:
    for i, row in enumerate(ids):
        if len(row) < need:
            raise ValueError(f"sentences[{i}] is {len(row)} tokens; this bundle pools "
                             f"{'at a token index and' if need > 1 else 'and'} needs ≥ {need}")


def _progress(batches: list[np.ndarray], enabled: bool, total: int) -> Iterator[np.ndarray]:
    bar = _bar(enabled, total)
    for b in batches:
        yield b
        bar.update(len(b))
    bar.close()


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(enabled: bool, total: int | None) -> Any:
    """A tqdm bar over sentences when asked for and tqdm is installed, else a no-op."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional for the runtime
        return _NoBar()
    return tqdm(total=total, desc="encode", unit="sent")
