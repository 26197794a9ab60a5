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
        self.char_cap = max_length * CHARS_PER_TOKEN_CAP  # characters read before growing

    @property
    def backend(self) -> Tokenizer:
        """The untruncated tokenizer (for inspection and saving)."""
        return self._plain

    def encode(self, texts: Sequence[str], prompt: str | None = None) -> list[list[int]]:
        """Token ids per text (special tokens added), at most max_length each."""
        if not texts:
            return []
        windows = [_cut(t, self.char_cap) for t in texts]
        cut = [i for i, (t, w) in enumerate(zip(texts, windows, strict=True)) if len(w) < len(t)]
        for i in cut:  # the part past the window is never tokenized: check it here
            _check_unicode(i, texts[i])
        rows = self._rows(windows, prompt, texts)
        for i in cut:
            if not self._settled(texts[i], windows[i], rows[i]):
                rows[i] = self._grown(texts[i], prompt, rows[i])[1]
        return rows

    def window(self, text: str, prompt: str | None = None) -> str:
        """The start of `text` that `encode` tokenizes: all of it, or a prefix whose row
        fills max_length tokens and which ends between words or gives the row the prefix half
        its length gives (so the cap only ever drops tokens that truncation drops too)."""
        cut = _cut(text, self.char_cap)
        if len(cut) == len(text):
            return cut
        row = self._rows([cut], prompt, [text])[0]
        return cut if self._settled(text, cut, row) else self._grown(text, prompt, row)[0]

    def _settled(self, text: str, cut: str, row: list[int]) -> bool:
        """The row of the window `cut` is the text's: it fills max_length and the window
        ends between words (a word cut in two, where no space was near the cap, tokenizes
        otherwise, and its pieces may fall among the kept tokens)."""
        return len(row) >= self.max_length and between_words(text, len(cut))

    def _grown(self, text: str, prompt: str | None,
               row: list[int]) -> tuple[str, list[int]]:
        """The window doubled from the cap until it is the whole text or its row is settled:
        it fills max_length, ending between words or giving the row the window half its
        size gave (whitespace runs, words cut in two); tokenized off the GIL (a megabyte of
        spaces takes ~0.6 s)."""
        cap, before = 2 * self.char_cap, row
        while True:
            cut = _cut(text, cap)
            row = self._rows([cut], prompt, [text], pool=True)[0]
            if len(cut) == len(text) or self._settled(text, cut, row) or (
                    len(row) >= self.max_length and row == before):
                return cut, row
            cap, before = 2 * cap, row

    def _rows(self, windows: list[str], prompt: str | None, texts: Sequence[str],
              pool: bool = False) -> list[list[int]]:
        try:
            if prompt is None:
                return [e.ids for e in _encode_all(self._truncating, windows, True, pool)]
            head, tail = split_prompt(prompt)
            encs = _encode_all(self._plain, [head + t + tail for t in windows], pool=pool)
        except TypeError:  # the Rust side refuses str it cannot encode as UTF-8
            _raise_unencodable(texts, prompt)
            raise
        return [self._fit(e, len(head), len(t), prompt)
                for e, t in zip(encs, windows, strict=True)]

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
        if len(text_pos) <= excess:  # no text token would be left
            n_prompt = len(ids) - len(text_pos)
            raise ValueError(
                f"the prompt {prompt!r} alone is {n_prompt} tokens, which leaves no room for "
                f"the text within max_length={self.max_length}"
            )
        drop = set(text_pos[len(text_pos) - excess:])
        return [t for i, t in enumerate(ids) if i not in drop]


def _cut(text: str, cap: int) -> str:
    """The first `cap` characters of `text`, cut at a space where there is one."""
    if len(text) <= cap:
        return text
    cut = text.rfind(" ", cap // 2, cap)
    return text[: cut if cut > 0 else cap]


def between_words(text: str, at: int) -> bool:
    """Whether position `at` of `text` separates words (whitespace on either side)."""
    return at >= len(text) or text[at].isspace() or (at > 0 and text[at - 1].isspace())


def tail_cut(text: str, cap: int) -> str:
    """The last `cap` characters of `text`, from a space where there is one (its first
    word then tokenizes as it does in the whole text)."""
    if len(text) <= cap:
        return text
    start = len(text) - cap
    cut = text.find(" ", start, start + cap // 2)
    return text[cut if cut >= 0 else start:]


def encode_one(tok: Tokenizer, text: str, long: int, add_special_tokens: bool = True,
               ) -> Encoding:
    """`tok.encode(text)`; a text over `long` characters through the batch call, which
    releases the GIL (a megabyte takes ~1 s: the event loop must not wait for it)."""
    if len(text) <= long:
        return tok.encode(text, add_special_tokens=add_special_tokens)
    return tok.encode_batch([text], add_special_tokens=add_special_tokens)[0]


def _encode_all(tok: Tokenizer, texts: list[str], fast: bool = False,
                pool: bool = False) -> list[Encoding]:
    """One Rust call for the texts; a lone text in a plain call, as the batch call hands
    even one text to Rust's thread pool (a hop that cost a served one-sentence request
    ~0.15 ms of event-loop time under load), unless `pool` (the batch call releases the
    GIL: for long texts). `fast`: no offsets (ids only)."""
    if len(texts) == 1 and not pool:
        return [tok.encode(texts[0])]
    return tok.encode_batch_fast(texts) if fast else tok.encode_batch(texts)


def _raise_unencodable(texts: Sequence[str], prompt: str | None = None) -> None:
    """Name the first text, or the prompt, that is not valid Unicode (a lone surrogate)."""
    for i, text in enumerate(texts):
        _check_unicode(i, text)
    try:
        (prompt or "").encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"the prompt {prompt!r} is not valid Unicode ({exc.reason} at "
                         f"character {exc.start})") from None


def _check_unicode(i: int, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"sentences[{i}] is not valid Unicode ({exc.reason} at character "
                         f"{exc.start}); decode your input with errors='replace' or "
                         "clean it first") from None
