"""What production gets: odd input, damaged bundles, many threads, long streams, fuzz."""

import random
import shutil
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from angle_rt import ChecksumError, Encoder
from exporters.texts import builtin_sentences

ODD_TEXTS = [
    "\x00", "a\x00b", "\u200b", "\ufeff", "\uffff", "😀" * 50, "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛",
    "\r\n\t\x1b[31mred\x1b[0m", "مرحبا Привет 你好 こんにちは שלום", "e\u0301\u0301\u0301",
    "ｆｕｌｌｗｉｄｔｈ", "a" * 10_000, " " * 5000, "\n" * 300,
]


@pytest.fixture(scope="module")
def enc(tiny_bert_bundle):
    return Encoder(tiny_bert_bundle)


@pytest.mark.parametrize("text", ODD_TEXTS, ids=range(len(ODD_TEXTS)))
def test_odd_text_gives_a_finite_vector(enc, text):
    v = enc.encode(text)
    assert v.shape == (enc.dim,) and np.isfinite(v).all()


def test_iterables_arrays_and_generators(enc):
    texts = builtin_sentences()[:5]
    ref = enc.encode(texts)
    assert np.allclose(enc.encode(t for t in texts), ref, atol=1e-6)
    assert np.allclose(enc.encode(np.array(texts)), ref, atol=1e-6)
    assert np.allclose(enc.encode(tuple(texts)), ref, atol=1e-6)
    with pytest.raises(TypeError, match=r"sentences\[2\] is int"):
        enc.encode(x for x in ["a", "b", 3])
    with pytest.raises(TypeError, match="got dict"):
        enc.encode({"a": 1})


def test_invalid_unicode_names_the_item(enc):
    with pytest.raises(ValueError, match=r"sentences\[1\] is not valid Unicode"):
        enc.encode(["fine", "lone \udc80 surrogate"])


def test_5mb_string_costs_like_a_max_length_one(enc):
    huge = ("lorem ipsum dolor sit amet " * 200_000)[:5_000_000]
    short = huge[: enc.max_length * 40]
    assert np.allclose(enc.encode(huge), enc.encode(short), atol=1e-6)


def test_wrong_tokenizer_is_refused(tiny_bert_bundle, tiny_llama_dir, tmp_path):
    bundle = shutil.copytree(tiny_bert_bundle, tmp_path / "b")
    shutil.copy(tiny_llama_dir / "tokenizer.json", bundle / "tokenizer.json")
    with pytest.raises(ChecksumError, match=r"tokenizer\.json does not match"):
        Encoder(bundle)


def test_stream_is_encoded_in_order_with_bounded_chunks(enc):
    texts = [f"{s} #{i}" for i, s in enumerate(builtin_sentences()[:50] * 3)]
    chunks = list(enc.encode_iter(iter(texts), chunk_size=32, batch_size=8))
    assert [len(c) for c in chunks] == [32, 32, 32, 32, 22]
    assert np.allclose(np.concatenate(chunks), enc.encode(texts), atol=1e-6)
    with pytest.raises(TypeError, match=r"sentences\[40\] is NoneType"):
        list(enc.encode_iter([*texts[:40], None], chunk_size=16))
    with pytest.raises(TypeError, match="iterable of str"):
        list(enc.encode_iter("a string"))


def test_16_threads_200_encodes_each_equal_serial(enc):
    pool = builtin_sentences()
    rng = random.Random(0)
    jobs = [[rng.sample(pool, rng.randint(1, 4)) for _ in range(200)] for _ in range(16)]
    expected = {tuple(t): enc.encode(list(t), batch_size=2) for job in jobs
                for t in map(tuple, job)}
    failures, done = [], []

    def worker(k):
        for j, texts in enumerate(jobs[k]):
            if k == 3 and j == 100:  # one call fails inside tokenization; nobody stalls
                with pytest.raises(ValueError):
                    enc.encode([*texts, "bad \udc80", *texts])
            got = enc.encode(texts, batch_size=2)
            if not np.array_equal(got, expected[tuple(texts)]):
                failures.append((k, j))
        done.append(k)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(done) == list(range(16)) and not failures


texts_st = st.lists(st.text(min_size=0, max_size=80).filter(
    lambda s: s.encode("utf-8", "surrogatepass") == s.encode("utf-8", "ignore")),
    min_size=1, max_size=12)


@given(texts_st, st.integers(1, 5), st.sampled_from([32, 200, 4096]))
@settings(max_examples=60, deadline=None)
def test_batches_equal_one_by_one(tiny_bert_bundle, texts, batch_size, budget):
    enc = _encoder(tiny_bert_bundle, budget)
    together = enc.encode(texts, batch_size=batch_size)
    assert together.shape == (len(texts), enc.dim) and together.dtype == np.float32
    alone = np.stack([enc.encode(t) for t in texts])
    assert np.allclose(together, alone, atol=1e-5)


@given(texts_st, st.integers(1, 32))
@settings(max_examples=40, deadline=None)
def test_truncate_then_normalize(tiny_bert_bundle, texts, dim):
    enc = _encoder(tiny_bert_bundle, 4096)
    full = enc.encode(texts)
    cut = enc.encode(texts, truncate_dim=dim, normalize_embeddings=True)
    ref = full[:, :dim] / np.maximum(np.linalg.norm(full[:, :dim], axis=1, keepdims=True),
                                     1e-12)
    assert cut.shape == (len(texts), dim) and np.allclose(cut, ref, atol=1e-5)


_ENCODERS: dict = {}


def _encoder(bundle, budget):
    if budget not in _ENCODERS:
        _ENCODERS[budget] = Encoder(bundle, max_batch_tokens=budget)
    return _ENCODERS[budget]


def test_fuzz_random_unicode_for_a_seeded_count(enc):
    """Random code points (all planes, controls, combining marks, surrogates) in 600 random
    batches (seeded, so every run checks the same ones): every call returns finite vectors
    or a ValueError naming an item."""
    rng = random.Random(1234)
    calls = 0
    for _ in range(600):
        texts = ["".join(chr(_codepoint(rng)) for _ in range(rng.randint(0, 60)))
                 for _ in range(rng.randint(1, 16))]
        try:
            out = enc.encode(texts, batch_size=rng.randint(1, 8))
        except ValueError as exc:
            assert "is not valid Unicode" in str(exc)
            continue
        assert out.shape == (len(texts), enc.dim) and np.isfinite(out).all()
        calls += 1
    assert calls > 20


def _codepoint(rng: random.Random) -> int:
    pick = rng.random()
    if pick < 0.5:
        return rng.randint(0x20, 0x7E)
    if pick < 0.8:
        return rng.randint(0x80, 0xFFFF)
    if pick < 0.98:
        return rng.randint(0x10000, 0x10FFFF)
    return rng.randint(0xD800, 0xDFFF)  # lone surrogates: must be refused cleanly
