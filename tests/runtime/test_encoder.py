import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from angle_rt import Encoder
from angle_rt.prompts import PROMPTS
from exporters.texts import builtin_sentences

SENTENCES = builtin_sentences()


@pytest.fixture(scope="module")
def enc(minilm_bundle):
    return Encoder(minilm_bundle)


def test_shapes_and_types(enc):
    one = enc.encode("A man is playing a guitar.")
    assert one.shape == (384,) and one.dtype == np.float32
    many = enc.encode(["a", "b", "c"])
    assert many.shape == (3, 384) and many.dtype == np.float32
    assert np.allclose(many[0], enc.encode("a"), atol=1e-6)
    as_list = enc.encode(["a", "b"], convert_to_numpy=False)
    assert isinstance(as_list, list) and len(as_list) == 2 and as_list[0].shape == (384,)
    assert enc.encode(("a", "b")).shape == (2, 384)
    assert enc.encode(np.array(["a", "b"])).shape == (2, 384)


def test_empty_list_gives_zero_rows(enc):
    out = enc.encode([])
    assert out.shape == (0, 384) and out.dtype == np.float32


@pytest.mark.parametrize("text", ["", "   ", "\t\n"])
def test_empty_and_blank_strings_give_valid_vectors(enc, text):
    v = enc.encode(text)
    assert np.isfinite(v).all() and np.linalg.norm(v) > 0.5


@pytest.mark.parametrize(("bad", "where"), [
    (["ok", None], r"sentences\[1\] is NoneType"),
    (["ok", "fine", 3], r"sentences\[2\] is int"),
    ([b"bytes"], r"sentences\[0\] is bytes"),
    ([["nested"]], r"sentences\[0\] is list"),
    (None, "got NoneType"),
    (42, "got int"),
    (np.array([["a"], ["b"]]), "1-D"),
])
def test_bad_input_is_a_type_error_naming_the_item(enc, bad, where):
    with pytest.raises(TypeError, match=where):
        enc.encode(bad)


def test_bad_arguments(enc):
    with pytest.raises(ValueError, match="batch_size"):
        enc.encode(["a"], batch_size=0)
    with pytest.raises(ValueError, match="truncate_dim"):
        enc.encode(["a"], truncate_dim=1000)
    with pytest.raises(ValueError, match="unknown prompt_name"):
        enc.encode(["a"], prompt_name="nope")


def test_what_once_passed_wrongly_or_named_the_wrong_item(enc):
    """A DataFrame iterated over its column labels (the vector of "text"); encode_iter took
    chunk_size 0 (one unbounded chunk) and named a bad text by its place in its chunk."""
    pd = pytest.importorskip("pandas")
    with pytest.raises(TypeError, match=r"DataFrame: pass one column"):
        enc.encode(pd.DataFrame({"text": ["a", "b"]}))
    for size in (0, -1, True):
        with pytest.raises(ValueError, match="chunk_size"):
            list(enc.encode_iter(["a"], chunk_size=size))
    with pytest.raises(ValueError, match=r"sentences\[12\] is not valid Unicode"):
        list(enc.encode_iter(["ok"] * 12 + ["bad \udc80"], chunk_size=5))


def test_encode_iter_refuses_what_encode_refuses(enc):
    """encode_iter embedded a DataFrame's column labels and a dict's keys (one vector for
    "text" where three rows were given), where encode raised."""
    pd = pytest.importorskip("pandas")
    for bad, match in ((pd.DataFrame({"text": ["a", "b", "c"]}), "DataFrame: pass one column"),
                       ({"a": 1, "b": 2}, "got dict"), (b"bytes", "got bytes")):
        with pytest.raises(TypeError, match=match):
            list(enc.encode_iter(bad))


def test_conflicting_or_odd_arguments_are_refused_clearly(enc, minilm_bundle):
    """prompt and prompt_name together silently took prompt_name; a surrogate past the
    tokenizer's character window was accepted, one in the prompt raised a bare Rust error;
    max_batch_tokens 0 or None failed later inside the planner; numpy ints were refused."""
    with pytest.raises(ValueError, match=r"prompt_name .* not both"):
        enc.encode("a", prompt="query: ", prompt_name="C")
    past_window = "word " * (enc.max_length * 8) + "\udc80"
    assert len(enc.tokenizer.window(past_window[:-1])) < len(past_window)
    with pytest.raises(ValueError, match=r"sentences\[1\] is not valid Unicode"):
        enc.encode(["fine", past_window])
    with pytest.raises(ValueError, match=r"prompt .* is not valid Unicode"):
        enc.encode(["fine"], prompt="query\ud800: ")
    for bad in (0, None, True, 2.5):
        with pytest.raises(ValueError, match="max_batch_tokens must be a positive int"):
            Encoder(minilm_bundle, max_batch_tokens=bad)
    ref = enc.encode(["a", "b"])
    assert np.array_equal(enc.encode(["a", "b"], batch_size=np.int64(1)), ref)
    assert np.array_equal(np.concatenate(list(enc.encode_iter(["a", "b"],
                                                              chunk_size=np.int64(1)))), ref)


def test_truncate_and_normalize_follow_sentence_transformers(enc):
    full = enc.encode(SENTENCES[:5])
    cut = enc.encode(SENTENCES[:5], truncate_dim=64)
    assert np.allclose(cut, full[:, :64])
    cut_n = enc.encode(SENTENCES[:5], truncate_dim=64, normalize_embeddings=True)
    assert np.allclose(np.linalg.norm(cut_n, axis=1), 1.0, atol=1e-5)
    assert np.allclose(cut_n, cut / np.linalg.norm(cut, axis=1, keepdims=True), atol=1e-6)


def test_prompt_forms_agree(enc):
    text = "how do I renew a passport"
    by_template = enc.encode(text, prompt=PROMPTS["C"])
    assert np.allclose(enc.encode(text, prompt="C"), by_template)
    assert np.allclose(enc.encode(text, prompt_name="C"), by_template)
    prefix = "Represent this sentence for searching relevant passages: "
    assert np.allclose(enc.encode(text, prompt=prefix), by_template, atol=1e-6)
    assert not np.allclose(enc.encode(text), by_template, atol=1e-3)
    assert np.allclose(enc.encode(text, prompt=""), enc.encode(text))


def test_overlong_text_is_truncated(enc):
    long_text = " ".join(SENTENCES[:200])
    head = enc.tokenizer.backend.decode(enc.tokenizer.encode([long_text])[0][1:-1])
    v, ref = enc.encode(long_text), enc.encode(head)
    assert float(v @ ref) > 0.9999


@given(st.lists(st.integers(0, len(SENTENCES) - 1), min_size=1, max_size=24),
       st.integers(1, 7), st.sampled_from([64, 300, 2048]))
@settings(max_examples=25, deadline=None)
def test_order_restored_under_sorting_and_packing(minilm_bundle, picks, batch_size, budget):
    enc = _small_budget_encoder(minilm_bundle, budget)
    texts = [SENTENCES[i] for i in picks]
    together = enc.encode(texts, batch_size=batch_size)
    alone = np.stack([_reference(minilm_bundle, t) for t in texts])
    assert np.allclose(together, alone, atol=2e-6)


_CACHE: dict = {}


def _small_budget_encoder(bundle, budget):
    key = ("enc", budget)
    if key not in _CACHE:
        _CACHE[key] = Encoder(bundle, max_batch_tokens=budget)
    return _CACHE[key]


def _reference(bundle, text):
    key = ("ref", text)
    if key not in _CACHE:
        _CACHE[key] = _small_budget_encoder(bundle, 2048).encode(text)
    return _CACHE[key]


def test_concurrent_encodes_equal_serial(enc):
    batches = [SENTENCES[i:i + 40] for i in range(0, 320, 40)]
    serial = [enc.encode(b) for b in batches]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(i):
        try:
            results[i] = enc.encode(batches[i], batch_size=8)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, ref in enumerate(serial):
        assert np.allclose(results[i], ref, atol=2e-6)


def test_ort_config_reaches_the_session_and_keeps_vectors(tiny_bert_bundle):
    """`ort_config` entries land in ONNX Runtime's session options (what `angle-rt serve`
    uses to stop idle threads spinning) and change no vector."""
    texts = builtin_sentences()[:20]
    key = "session.intra_op.allow_spinning"
    with Encoder(tiny_bert_bundle, intra_op_threads=2) as plain, \
            Encoder(tiny_bert_bundle, intra_op_threads=2, ort_config={key: "0"}) as calm:
        opts = calm.session.inference_session.get_session_options()
        assert opts.get_session_config_entry(key) == "0"
        with pytest.raises(RuntimeError, match="does not have configuration"):
            plain.session.inference_session.get_session_options().get_session_config_entry(key)
        np.testing.assert_array_equal(calm.encode(texts), plain.encode(texts))


def test_batch_cost_scales_with_the_threads_of_a_run(tiny_bert_bundle):
    """A run's fixed cost is wall time and a token's time shrinks with threads: on one thread
    (the server's workers) a long row among short ones is worth its own run sooner, and the
    vectors are the same whichever plan ran."""
    window = [20, 12, 12, 12]  # one batch: 4 x 20 padded tokens; split: 20 + 3 x 12
    texts = builtin_sentences()[:40]
    with Encoder(tiny_bert_bundle, intra_op_threads=1) as one, \
            Encoder(tiny_bert_bundle, intra_op_threads=2) as two:
        assert one.session.batch_cost < two.session.batch_cost
        assert [len(b) for b in one.plan(window, 32)] == [1, 3]
        assert [len(b) for b in two.plan(window, 32)] == [4]
        np.testing.assert_allclose(one.encode(texts, batch_size=4),
                                   two.encode(texts, batch_size=4), atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "int8-dynamic"])
def test_streams_give_the_vectors_of_one_batch_at_a_time(minilm_precisions, precision):
    """Batches run side by side (the CPU default: one a core, one ORT thread each) give
    bit-identical vectors to one batch at a time on every thread, at any batch size."""
    texts = (SENTENCES * 3)[:150]
    with Encoder(minilm_precisions, precision=precision, intra_op_threads=2) as one, \
            Encoder(minilm_precisions, precision=precision, streams=3,
                    intra_op_threads=1) as three:
        assert (one.streams, three.streams) == (1, 3)
        for bs in (1, 7, 64):
            np.testing.assert_array_equal(three.encode(texts, batch_size=bs),
                                          one.encode(texts, batch_size=bs))
        np.testing.assert_array_equal(three.encode(texts, show_progress_bar=True),
                                      one.encode(texts))
        assert three._pool is not None
    assert three._pool is None  # close() shut its threads down


def test_streams_default_and_bad_values(minilm_bundle, monkeypatch):
    import angle_rt.encoder as encoder

    monkeypatch.setattr(encoder, "physical_cores", lambda: 4)
    assert encoder._parallelism("cpu", None, None) == (1, 4)  # one batch a core
    assert encoder._parallelism("cpu", 2, None) == (2, 1)  # threads named: as before
    assert encoder._parallelism("cpu", None, 2) == (2, 2)
    assert encoder._parallelism("cuda", None, None) == (None, 1)
    with pytest.raises(ValueError, match="runs on cuda"):
        encoder._parallelism("cuda", None, 2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="streams must be a positive int"):
            Encoder(minilm_bundle, streams=bad)


def test_a_failing_batch_fails_the_call_and_the_encoder_goes_on(minilm_bundle):
    """An error in one of the side-by-side batches reaches the caller (nothing half-written
    is returned), the batches not started are dropped, and the next call works."""
    texts = SENTENCES[:64]
    with Encoder(minilm_bundle, streams=2, intra_op_threads=1) as enc:
        ref = enc.encode(texts, batch_size=4)
        real, calls = enc._run_rows, []

        def flaky(rows):
            calls.append(len(rows))
            if len(calls) == 3:
                raise RuntimeError("backend failed")
            return real(rows)

        enc._run_rows = flaky
        with pytest.raises(RuntimeError, match="backend failed"):
            enc.encode(texts, batch_size=4)
        assert len(calls) < 16  # the rest of the 16 batches were dropped
        enc._run_rows = real
        np.testing.assert_array_equal(enc.encode(texts, batch_size=4), ref)
