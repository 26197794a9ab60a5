"""tokenizer.json → token ids, with truncation at max_length that keeps the prompt.

The runtime sets padding and truncation itself: a model's tokenizer.json often carries
its own (even fixed-length) padding, and mean pooling would then average pad tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Encoding, Tokenizer

from angle_rt.prompts import split_prompt

# Only the first max_length * 32 characters of a text are read (cut at a space where there
# is one): tokenizing a 5 MB string takes seconds, and real text needs far fewer than
# 32 characters per token to fill max_length.
CHARS_PER_TOKEN_CAP = 32


class TextTokenizer:
    """Tokenizes a request in one Rust call (`_encode_all`); returns one id list per text."""

    def __init__(self, tokenizer: str | Path | Tokenizer, max_length: int) -> None:
        if isinstance(tokenizer, Tokenizer):
            source = tokenizer.to_str()
            self._plain = Tokenizer.from_str(source)
            self._truncating = Tokenizer.from_str(source)
        else:
            self._plain = Tokenizer.from_file(str(tokenizer))
            self._truncating = Tokenizer.from_file(str(tokenizer))
        self.max_length = max_length
        self._plain.no_padding()
        self._plain.no_truncation()
        self._truncating.no_padding()
        self._truncating.enable_truncation(max_length, direction="right")
        self._char_cap = max_length * CHARS_PER_TOKEN_CAP

    @property
    def backend(self) -> Tokenizer:
        """The untruncated tokenizer (for inspection and saving)."""
        return self._plain

    def encode(self, texts: Sequence[str], prompt: str | None = None) -> list[list[int]]:
        """Token ids per text (special tokens added), at most max_length each."""
        if not texts:
            return []
        capped = [self._cap(t) for t in texts]
        try:
            if prompt is None:
                return [e.ids for e in _encode_all(self._truncating, capped, fast=True)]
            head, tail = split_prompt(prompt)
            encs = _encode_all(self._plain, [head + t + tail for t in capped])
        except TypeError:  # the Rust side refuses str it cannot encode as UTF-8
            _raise_unencodable(texts)
            raise
        return [self._fit(e, len(head), len(t), prompt) for e, t in zip(encs, capped, strict=True)]

    def _cap(self, text: str) -> str:
        if len(text) <= self._char_cap:
            return text
        cut = text.rfind(" ", self._char_cap // 2, self._char_cap)
        return text[: cut if cut > 0 else self._char_cap]

    def _fit(self, enc: Encoding, start: int, length: int, prompt: str) -> list[int]:
        """Drop text tokens from the end of the sentence until max_length fits."""
        ids = enc.ids
        excess = len(ids) - self.max_length
        if excess <= 0:
            return ids
        end = start + length
        marks = zip(enc.offsets, enc.special_tokens_mask, strict=True)
        text_pos = [i for i, ((s, _), special) in enumerate(marks)
                    if not special and start <= s < end]
        if len(text_pos) < excess:
            n_prompt = len(ids) - len(text_pos)
            raise ValueError(
                f"the prompt {prompt!r} alone is {n_prompt} tokens, which leaves no room for "
                f"the text within max_length={self.max_length}"
            )
        drop = set(text_pos[len(text_pos) - excess:])
        return [t for i, t in enumerate(ids) if i not in drop]


def _encode_all(tok: Tokenizer, texts: list[str], fast: bool = False) -> list[Encoding]:
    """One Rust call for the texts; a lone text in a plain call, as the batch call hands
    even one text to Rust's thread pool (a hop that cost a served one-sentence request
    ~0.15 ms of event-loop time under load). `fast`: no offsets (ids only)."""
    if len(texts) == 1:
        return [tok.encode(texts[0])]
    return tok.encode_batch_fast(texts) if fast else tok.encode_batch(texts)


def _raise_unencodable(texts: Sequence[str]) -> None:
    """Name the first text that is not valid Unicode (a lone surrogate, say)."""
    for i, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"sentences[{i}] is not valid Unicode ({exc.reason} at character "
                             f"{exc.start}); decode your input with errors='replace' or "
                             "clean it first") from None
