"""A served bundle: its Encoder, its batcher, and the request-side steps around them —
token rows for a request (the Encoder's own tokenizer, prompt and truncation), and the
vectors' finish (Matryoshka dimensions, normalization) exactly as `Encoder.encode` does."""

from __future__ import annotations

import re
import time
from typing import Any

import numpy as np
from tokenizers import Encoding

import angle_rt
from angle_rt.encoder import Encoder
from angle_rt.manifest import min_tokens
from angle_rt.postprocess import l2_normalize, truncate_dims
from angle_rt.prompts import split_prompt
from angle_rt.quantization import needs_ranges, quantize_embeddings, read_ranges
from angle_rt.serve.batcher import Batcher, OnBatch
from angle_rt.serve.config import ServeConfig
from angle_rt.serve.protocol import ApiError, EmbedRequest, invalid
from angle_rt.tokenizer import between_words, encode_one, tail_cut

_ITEM = re.compile(r"sentences\[(\d+)\]")
# a turn's tokens: on CPU per ONNX Runtime thread of a worker, so a turn takes about as long
# whatever the split (measured, benchmarks/serve_flood.py: 512 for one worker on 2 threads,
# 256 for workers on 1 thread each); GPUs want bigger batches (not measured here)
FAIR_QUANTUM_CPU_PER_THREAD, FAIR_QUANTUM_GPU = 256, 8192
# CPU: a thread for new requests of this many padded tokens or fewer while every worker
# runs a turn of a larger request (a one-sentence request then waits for no flood turn;
# measured, docs/serving.md); on GPU a batch is short and the contexts are the workers'
LANE_TOKENS_CPU = 128


class ServedModel:
    """One bundle behind the server, selected by the request's `model`."""

    def __init__(self, name: str, encoder: Encoder, config: ServeConfig,
                 on_batch: OnBatch | None = None) -> None:
        self.name, self.encoder, self.config = name, encoder, config
        self.dim, self.max_length = encoder.dim, encoder.max_length
        self.normalized = bool(encoder.manifest.normalized)
        self.created = int(time.time())
        gpu = encoder.session.name.startswith(("tensorrt", "onnxruntime-cuda"))
        # CPU: as many as the batches the Encoder runs side by side (one a core by default)
        self.workers = config.workers or (2 if encoder.session.name.startswith("tensorrt")
                                          else encoder.streams)
        self.fair_quantum_tokens = config.fair_quantum_tokens or (
            FAIR_QUANTUM_GPU if gpu else FAIR_QUANTUM_CPU_PER_THREAD * (encoder.threads or 1))
        lane = 0 if gpu else LANE_TOKENS_CPU
        self.lane_tokens = lane if config.lane_tokens is None else config.lane_tokens
        self.batcher = Batcher(encoder.run_batch, encoder.plan, encoder.dim,
                               max_batch_size=config.max_batch_size,
                               max_batch_tokens=encoder.max_batch_tokens,
                               workers=self.workers, max_wait_ms=config.max_wait_ms,
                               max_queued_tokens=config.max_queued_tokens,
                               fair_quantum_tokens=self.fair_quantum_tokens,
                               lane_tokens=self.lane_tokens, on_batch=on_batch,
                               name=f"batch-{name}")
        backend = encoder.tokenizer.backend
        self._backend = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset(i for i, tok in backend.get_added_tokens_decoder().items()
                                     if tok.special)
        self._min_tokens = min_tokens(encoder.manifest.pooling)
        self.ranges = read_ranges(config.output_ranges) if config.output_ranges else None

    # -- requests ------------------------------------------------------------------------

    def check_dimensions(self, dimensions: int | None) -> None:
        if dimensions is not None and dimensions > self.dim:
            raise invalid(f"dimensions={dimensions} is larger than this model's {self.dim}",
                          "dimensions")

    def rows(self, req: EmbedRequest, truncate: bool) -> list[list[int]]:
        """Token rows to embed: texts tokenized as `Encoder.encode` tokenizes them, or the
        request's token ids checked against the vocabulary. 422 names the bad input."""
        if req.texts is not None:
            return self._tokenize(req, truncate)
        return self._check_ids(req.ids or [], truncate, req.field, req.truncation_direction)

    def _tokenize(self, req: EmbedRequest, truncate: bool) -> list[list[int]]:
        try:
            template = self.encoder.template(req.prompt, req.prompt_name)
        except ValueError as exc:
            raise invalid(str(exc), "prompt_name") from None
        texts = req.texts or []
        try:
            rows = self.encoder.tokenize(texts, template)
        except ValueError as exc:
            msg = str(exc)
            item = _ITEM.search(msg)
            param = req.field if item else "prompt"
            raise invalid(_ITEM.sub(lambda m: f"{req.field}[{m.group(1)}]", msg),
                          param) from None
        if not truncate:
            self._refuse_truncated(texts, rows, template, req.field)
        elif req.truncation_direction == "left":
            rows = [self._left(text, row, template) for text, row in zip(texts, rows,
                                                                          strict=True)]
        return rows

    def _left(self, text: str, row: list[int], template: str | None) -> list[int]:
        """A row that max_length cut, cut from the start of the text instead: its leading
        special tokens and prompt, then the text's last tokens, then its closing ones. The
        text's end is read from the character cap, doubled until it is the whole text or
        holds more than max_length tokens and starts between words or gives the row half
        as much gave (a text ending in a long run of spaces once kept only those)."""
        if len(row) < self.max_length:
            return row
        head, tail = split_prompt(template) if template else ("", "")
        cap, before = self.encoder.tokenizer.char_cap, None
        while True:
            part = tail_cut(text, cap)
            full = encode_one(self._backend, head + part + tail, cap)
            left = self._left_row(full, head)
            over = len(full.ids) > self.max_length
            if len(part) == len(text) or (over and (
                    between_words(text, len(text) - len(part)) or left == before)):
                return left
            cap, before = 2 * cap, left if over else None

    def _left_row(self, full: Encoding, head: str) -> list[int]:
        if len(full.ids) <= self.max_length:
            return list(full.ids)
        mask = full.special_tokens_mask
        lead = next(i for i, m in enumerate(mask) if not m)
        lead += len(self._backend.encode(head, add_special_tokens=False).ids) if head else 0
        trail = next(i for i, m in enumerate(reversed(mask)) if not m)
        keep = self.max_length - lead - trail
        end = len(full.ids) - trail
        return [*full.ids[:lead], *full.ids[end - keep:end], *full.ids[end:]]

    def _refuse_truncated(self, texts: list[str], rows: list[list[int]],
                          template: str | None, field: str) -> None:
        """422 for the first text that max_length cut (only rows that reached it are
        tokenized again, untruncated: the window `encode` read, or the whole text when
        that window holds exactly max_length tokens)."""
        head, tail = split_prompt(template) if template else ("", "")
        cap = self.encoder.tokenizer.char_cap
        for i, row in enumerate(rows):
            if len(row) < self.max_length:
                continue
            text = texts[i]
            window = self.encoder.tokenizer.window(text, template)
            n = len(encode_one(self._backend, head + window + tail, cap).ids)
            if n <= self.max_length and len(window) < len(text):
                n = len(encode_one(self._backend, head + text + tail, cap).ids)
            if n <= self.max_length:
                continue
            size = f"{n} tokens" if len(window) == len(text) else f"{len(text)} characters"
            raise invalid(f"{field}[{i}] is {size}, over this model's max_length "
                          f"{self.max_length}, and truncation is off; shorten it or send "
                          "truncate", field, "input_too_long")

    def _check_ids(self, ids: list[list[int]], truncate: bool, field: str,
                   direction: str = "right") -> list[list[int]]:
        out = []
        for i, row in enumerate(ids):
            if max(row) >= self.vocab_size:
                bad = next(t for t in row if t >= self.vocab_size)
                raise invalid(f"{field}[{i}] holds token id {bad}, outside this model's "
                              f"vocabulary (0..{self.vocab_size - 1})", field)
            if len(row) < self._min_tokens:
                raise invalid(f"{field}[{i}] is {len(row)} tokens; this bundle pools at a "
                              f"token index and needs ≥ {self._min_tokens}", field)
            if len(row) > self.max_length:
                if not truncate:
                    raise invalid(f"{field}[{i}] is {len(row)} tokens, over this model's "
                                  f"max_length {self.max_length}, and truncation is off",
                                  field, "input_too_long")
                row = self._cut(row, direction)
            out.append(row)
        return out

    def _cut(self, row: list[int], direction: str = "right") -> list[int]:
        """max_length ids, keeping an opening and a closing special token ([CLS], [SEP])
        in place; `direction` left drops the first tokens instead of the last."""
        if direction == "left":
            lead = 1 if row[0] in self.special_ids else 0
            return [*row[:lead], *row[len(row) - self.max_length + lead:]]
        if row[-1] in self.special_ids:
            return [*row[: self.max_length - 1], row[-1]]
        return row[: self.max_length]

    def check_output_dtype(self, output_dtype: str | None, dimensions: int | None) -> str:
        """The request's output dtype (the server's by default); 422 for int8/uint8 without
        ranges for this width."""
        dtype = output_dtype or self.config.output_dtype
        if needs_ranges(dtype):
            width = dimensions or self.dim
            if self.ranges is None:
                raise invalid(f"output_dtype {dtype} needs calibration ranges: start the "
                              "server with --output-ranges", "output_dtype")
            if self.ranges.shape[1] != width:
                raise invalid(f"the server's {dtype} ranges are for {self.ranges.shape[1]} "
                              f"dimensions, not {width}", "output_dtype")
        return dtype

    def finish(self, vecs: np.ndarray, dimensions: int | None,
               normalize: bool | None = None, output_dtype: str = "float32") -> np.ndarray:
        """Matryoshka truncation, then L2 normalization when asked for (None: when the
        bundle normalizes, so a cut vector is unit again): `Encoder.encode(truncate_dim=d,
        normalize_embeddings=...)`; then `quantize_embeddings` to `output_dtype`."""
        out = truncate_dims(vecs, dimensions)
        if normalize or (normalize is None and self.normalized and dimensions is not None):
            out = l2_normalize(out)
        out = np.ascontiguousarray(out, dtype=np.float32)
        if output_dtype == "float32":
            return out
        return quantize_embeddings(out, output_dtype, ranges=self.ranges)

    def tokens(self, req: EmbedRequest, truncate: bool) -> list[list[dict[str, Any]]]:
        """TEI's `/tokenize` answer: the ids the model gets, with their token strings and,
        for text inputs, each token's character span in the text (None for special and
        prompt tokens, and for token-id inputs). 413 past --max-request-tokens, before a
        token's entry is built (a 2 MB text is ~950,000 tokens)."""
        plain = req.texts is not None and not (truncate and req.add_special_tokens)
        rows = self._plain_rows(req, truncate) if plain else self.rows(req, truncate)
        n = sum(map(len, rows))
        if n > self.config.max_request_tokens:
            raise ApiError(413, f"The request holds {n} tokens; this server's limit is "
                                f"{self.config.max_request_tokens} a request "
                                "(--max-request-tokens): split it", code="too_many_tokens")
        spans = self._spans(req, rows, plain) if req.texts is not None \
            else [[None] * len(r) for r in rows]
        out = []
        for row, row_spans in zip(rows, spans, strict=True):
            out.append([{"id": t, "text": self._backend.id_to_token(t),
                         "special": t in self.special_ids,
                         "start": span[0] if span else None, "stop": span[1] if span else None}
                        for t, span in zip(row, row_spans, strict=True)
                        if req.add_special_tokens or t not in self.special_ids])
        return out

    def _plain_rows(self, req: EmbedRequest, truncate: bool) -> list[list[int]]:
        """`/tokenize` rows: every token of the prompted text (TEI does not truncate here),
        special tokens only with `add_special_tokens`; cut at max_length if asked."""
        try:
            head, tail = split_prompt(self.encoder.template(req.prompt, req.prompt_name) or "")
        except ValueError as exc:
            raise invalid(str(exc), "prompt_name") from None
        # the batch call releases the GIL: these texts are read whole, megabytes maybe
        rows = [e.ids for e in self._backend.encode_batch(
            [head + t + tail for t in req.texts or []],
            add_special_tokens=req.add_special_tokens)]
        return [self._cut(r) if len(r) > self.max_length else r for r in rows] if truncate \
            else rows

    def _spans(self, req: EmbedRequest, rows: list[list[int]],
               whole: bool) -> list[list[Any]]:
        """(start, stop) in each text per token of its row: the row is a subsequence of the
        untruncated encoding of the prompted text (truncation only drops tokens), matched in
        order; offsets are shifted from the prompted text back to the input text. `whole`:
        the rows come from whole texts, else from the window `encode` read."""
        template = self.encoder.template(req.prompt, req.prompt_name)
        head, tail = split_prompt(template or "")
        cap = self.encoder.tokenizer.char_cap
        out = []
        for text, row in zip(req.texts or [], rows, strict=True):
            if not whole:
                text = self.encoder.tokenizer.window(text, template)
            enc = encode_one(self._backend, head + text + tail, cap,
                             add_special_tokens=req.add_special_tokens)
            marks = iter(zip(enc.ids, enc.offsets, enc.special_tokens_mask, strict=True))
            spans: list[Any] = []
            for t in row:
                for tid, (s, e), special in marks:
                    if tid == t:
                        inside = not special and len(head) <= s < len(head) + len(text)
                        spans.append((s - len(head), e - len(head)) if inside else None)
                        break
                else:
                    spans.append(None)
            out.append(spans)
        return out

    # -- description ------------------------------------------------------------------

    def card(self) -> dict[str, Any]:
        """An entry of `GET /v1/models`."""
        return {"id": self.name, "object": "model", "created": self.created,
                "owned_by": "angle-rt"}

    def info(self) -> dict[str, Any]:
        """`GET /info`: TEI's fields plus the bundle's settings and parity report."""
        enc, m, cfg = self.encoder, self.encoder.manifest, self.config
        return {
            "model_id": self.name,
            "model_sha": m.source.get("revision"),
            "model_dtype": enc.artifact.precision,
            "model_type": {"embedding": {"pooling": m.pooling}},
            "source": _public_source(m.source.get("model")),
            "dim": self.dim,
            "max_input_length": self.max_length,
            "max_length": self.max_length,
            "pooling": m.pooling,
            "normalized": self.normalized,
            "precision": enc.artifact.precision,
            "artifact": enc.artifact.file,
            "layers": enc.artifact.layers,  # an ESE depth variant; None: the full model
            "depth_source": enc.artifact.depth_source,  # a distilled variant's provenance
            "artifact_parity": enc.artifact.parity,
            "output_dtype": cfg.output_dtype,
            "output_ranges": self.ranges is not None,
            "backend": enc.session.name,
            "default_prompt": m.default_prompt,
            "prompts": sorted(enc.prompts),
            "parity": m.parity,
            "max_concurrent_requests": cfg.max_concurrent_requests,
            "max_batch_tokens": enc.max_batch_tokens,
            "max_batch_requests": cfg.max_batch_size,
            "max_client_batch_size": cfg.max_client_batch_size,
            "max_queued_tokens": cfg.max_queued_tokens,
            "max_request_tokens": cfg.max_request_tokens,
            "fair_quantum_tokens": self.fair_quantum_tokens,
            "lane_tokens": self.lane_tokens,
            "request_timeout": cfg.request_timeout,
            "auto_truncate": cfg.truncate,
            "workers": self.workers,
            "version": angle_rt.__version__,
        }

    def close(self, timeout: float | None = None) -> None:
        """Run what is queued, then release the Encoder."""
        self.batcher.close(drain=True, timeout=timeout)
        self.encoder.close()


def _public_source(source: str | None) -> str | None:
    """A hub id as it is; a local model directory by its name only (/info must not show
    the server's file system)."""
    if not source or not (source.startswith(("/", "~", ".")) or "\\" in source):
        return source
    return source.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
