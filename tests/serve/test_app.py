"""The ASGI app in-process (Starlette's TestClient) on the tiny bundle: TEI endpoints, several
models, prompts, token ids, index pooling, readiness, routing errors."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from starlette.testclient import TestClient

from angle_rt import Encoder
from angle_rt.serve.app import ServerState, build_app
from angle_rt.serve.config import ModelSpec, ServeConfig
from angle_rt.serve.metrics import Metrics
from angle_rt.serve.server import open_models
from exporters.texts import builtin_sentences
from tests.serve.conftest import same_bits


@contextmanager
def app_for(bundles: dict[str, Path], **settings) -> Iterator[tuple[TestClient, ServerState]]:
    config = ServeConfig(models=[ModelSpec(n, p) for n, p in bundles.items()],
                         access_log=False, **settings)
    metrics = Metrics()
    state = ServerState(open_models(config, metrics), config, metrics)
    with TestClient(build_app(state)) as client:
        deadline = time.monotonic() + 30
        while not state.ready and time.monotonic() < deadline:
            time.sleep(0.01)
        assert state.ready, state.warmup_error
        yield client, state


@pytest.fixture(scope="module")
def tiny(tiny_bert_bundle) -> Iterator[tuple[TestClient, ServerState]]:
    with app_for({"tiny": tiny_bert_bundle}) as pair:
        yield pair


@pytest.fixture(scope="module")
def enc(tiny_bert_bundle) -> Iterator[Encoder]:
    with Encoder(tiny_bert_bundle) as e:
        yield e


TEXTS = ["A man is playing a guitar.", "Someone plays music.", "", "多语言 text ✓"]


def test_tei_embed_normalize_and_dimensions(tiny, enc):
    client, _ = tiny
    raw = client.post("/embed", json={"inputs": TEXTS, "normalize": False})
    assert raw.status_code == 200
    same_bits(raw.json(), enc.encode(TEXTS))
    unit = np.array(client.post("/embed", json={"inputs": TEXTS}).json())
    same_bits(unit, enc.encode(TEXTS, normalize_embeddings=True))
    cut = np.array(client.post("/embed", json={"inputs": "one", "dimensions": 8}).json())
    same_bits(cut, enc.encode(["one"], truncate_dim=8, normalize_embeddings=True))
    r = client.post("/embed", json={"inputs": TEXTS})
    for header in ("x-compute-tokens", "x-total-time", "x-tokenization-time", "x-queue-time",
                   "x-inference-time", "x-request-id"):
        assert header in r.headers


def test_prompts_as_encode_applies_them(tiny, enc):
    client, _ = tiny
    for extra, kwargs in (({"prompt_name": "C"}, {"prompt_name": "C"}),
                          ({"prompt": "query: "}, {"prompt": "query: "})):
        r = client.post("/v1/embeddings", json={"input": TEXTS[:2], **extra,
                                                "encoding_format": "float"})
        got = np.array([d["embedding"] for d in r.json()["data"]])
        same_bits(got, enc.encode(TEXTS[:2], normalize_embeddings=True,
                                  **kwargs))  # unit: OpenAI's


def test_tokenize_info_and_models(tiny, enc):
    client, _ = tiny
    toks = client.post("/tokenize", json={"inputs": TEXTS[:2]}).json()
    assert [[t["id"] for t in row] for row in toks] == enc.tokenize(TEXTS[:2], None)
    assert toks[0][0] == {"id": 101, "text": "[CLS]", "special": True, "start": None,
                          "stop": None}
    bare = client.post("/tokenize", json={"inputs": "hi", "add_special_tokens": False}).json()
    assert [t["text"] for t in bare[0]] == ["hi"]
    for text, row in zip(TEXTS[:2], toks, strict=True):  # spans point into the input text
        pieces = [text[t["start"]:t["stop"]].lower() for t in row if not t["special"]]
        assert pieces == [t["text"].removeprefix("##") for t in row if not t["special"]]
    long = "word " * 200  # TEI's /tokenize: every token unless truncate is asked for
    whole = client.post("/tokenize", json={"inputs": long}).json()[0]
    assert len(whole) == 202 and whole[-1]["text"] == "[SEP]"
    bare = client.post("/tokenize", json={"inputs": long, "add_special_tokens": False}).json()
    assert [t["id"] for t in bare[0]] == [t["id"] for t in whole[1:-1]]  # tokenized, not filtered
    # truncated: the spans still index the kept tokens
    cut = client.post("/tokenize", json={"inputs": long, "prompt": "Q: {text}",
                                         "truncate": True}).json()[0]
    assert len(cut) == 64 and cut[-1]["text"] == "[SEP]"
    text_tokens = [t for t in cut if t["start"] is not None]
    assert text_tokens and all(long[t["start"]:t["stop"]] == "word" for t in text_tokens)
    assert [t["start"] for t in text_tokens] == list(range(0, 5 * len(text_tokens), 5))
    info = client.get("/info").json()
    assert info["model_id"] == "tiny" and info["dim"] == enc.dim
    assert info["max_input_length"] == 64 and info["pooling"] == "mean"
    assert info["backend"] == "onnxruntime-cpu" and "results" in info["parity"]
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]


def test_token_ids_past_max_length_are_cut_keeping_sep(tiny, enc):
    client, _ = tiny
    text = "the " * 100
    ids = enc.tokenizer.backend.encode(text).ids  # untruncated: 102 ids
    assert len(ids) > 64
    r = client.post("/v1/embeddings", json={"input": ids, "encoding_format": "float"})
    assert r.json()["usage"]["prompt_tokens"] == 64
    same_bits(r.json()["data"][0]["embedding"], enc.encode(text, normalize_embeddings=True))


def test_several_models_select_by_name(tiny_bert_bundle):
    with app_for({"a": tiny_bert_bundle, "b": tiny_bert_bundle}) as (client, _):
        assert client.post("/v1/embeddings", json={"input": "x", "model": "b"}).json()[
            "model"] == "b"
        assert client.post("/v1/embeddings", json={"input": "x"}).json()["model"] == "a"
        r = client.post("/v1/embeddings", json={"input": "x", "model": "c"})
        assert r.status_code == 404 and "a, b" in r.json()["error"]["message"]
        assert client.get("/info", params={"model": "b"}).json()["model_id"] == "b"


def test_depth_variants_served_by_name(tiny_depth_bundle):
    """`BUNDLE@K` (or --layers) serves an ESE bundle's depth variant: the vectors of
    `Encoder(layers=K)`, named apart from the full model; a missing depth fails the start."""
    from angle_rt.serve.config import parse_models

    specs = parse_models([str(tiny_depth_bundle), f"{tiny_depth_bundle}@1"])
    assert [(s.name, s.layers) for s in specs] == [("tiny-depth", None), ("tiny-depth@1", 1)]
    config = ServeConfig(models=specs, access_log=False)
    metrics = Metrics()
    state = ServerState(open_models(config, metrics), config, metrics)
    with TestClient(build_app(state)) as client, \
            Encoder(tiny_depth_bundle, layers=1) as cut, Encoder(tiny_depth_bundle) as full:
        for name, ref in (("tiny-depth@1", cut), ("tiny-depth", full)):
            got = client.post("/embed", json={"inputs": TEXTS[:2], "model": name,
                                              "normalize": False}).json()
            same_bits(got, ref.encode(TEXTS[:2]))
        info = client.get("/info", params={"model": "tiny-depth@1"}).json()
        assert info["layers"] == 1 and info["artifact"] == "model.L1.onnx"
        assert info["depth_source"] is None  # a cut, not a distilled student
    with pytest.raises(Exception, match="depth"):
        open_models(ServeConfig(models=[specs[0]], layers=3), Metrics())


def test_empty_string_refused_where_pooling_cannot_take_one(tiny_bert_bundle, tmp_path):
    """A bundle pooling at token 3 needs 4 tokens; "" has 2 ([CLS] [SEP])."""
    bundle = tmp_path / "index-pooling"
    shutil.copytree(tiny_bert_bundle, bundle)
    manifest = json.loads((bundle / "angle_rt.json").read_text())
    manifest["pooling"] = "3"
    (bundle / "angle_rt.json").write_text(json.dumps(manifest))
    with app_for({"idx": bundle}) as (client, _):
        r = client.post("/v1/embeddings", json={"input": ["a full sentence", ""]})
        err = r.json()["error"]
        assert r.status_code == 422 and "input[1]" in err["message"] and err["param"] == "input"
        r = client.post("/v1/embeddings", json={"input": [[101, 102]]})
        assert r.status_code == 422 and "input[0]" in r.json()["error"]["message"]
        assert client.post("/v1/embeddings", json={"input": "a full sentence"}).status_code \
            == 200


def test_ready_turns_503_while_draining_health_stays(tiny_bert_bundle):
    with app_for({"tiny": tiny_bert_bundle}) as (client, state):
        assert client.get("/ready").status_code == 200
        state.drain()
        r = client.get("/ready")
        assert r.status_code == 503 and r.json() == {"status": "draining"}
        assert client.get("/health").status_code == 200
        assert "angle_rt_ready 0.0" in client.get("/metrics").text


def test_routing_errors_in_openai_shape(tiny):
    client, _ = tiny
    r = client.get("/v1/embeddings")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    r = client.post("/v2/nothing", json={})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.post("/tokenize", json={"inputs": [[1, 2]]})
    assert r.status_code == 422


def test_metrics_list_every_documented_family(tiny):
    from angle_rt.serve.metrics import DESCRIPTIONS

    client, _ = tiny
    client.post("/v1/embeddings", json={"input": ["m"]})
    text = client.get("/metrics").text
    for name in DESCRIPTIONS:
        assert f"# HELP {name.removesuffix('_total')}" in text, name


def test_quantized_output_dtypes(tiny_bert_bundle, enc, tmp_path):
    """`output_dtype` per request (server default: --output-dtype) gives
    `quantize_embeddings` of the float vectors, as JSON numbers or base64 of their bytes;
    int8/uint8 use the server's --output-ranges and are refused without them."""
    import base64

    from angle_rt import calibration_ranges, quantize_embeddings

    ref = enc.encode(TEXTS[:2])
    unit = enc.encode(TEXTS[:2], normalize_embeddings=True)  # /v1/embeddings: unit vectors
    ranges = calibration_ranges(enc.encode(builtin_sentences()[:50],
                                           normalize_embeddings=True))
    np.save(tmp_path / "ranges.npy", ranges)
    with app_for({"tiny": tiny_bert_bundle}, output_dtype="ubinary",
                 output_ranges=tmp_path / "ranges.npy") as (client, _):
        for dtype in ("binary", "int8", "float16"):
            want = quantize_embeddings(unit, dtype, ranges=ranges)
            got = client.post("/v1/embeddings", json={"input": TEXTS[:2],
                                                      "output_dtype": dtype}).json()
            b64 = client.post("/v1/embeddings", json={"input": TEXTS[:2], "output_dtype": dtype,
                                                      "encoding_format": "base64"}).json()
            raw = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype=want.dtype)
                            for d in b64["data"]])
            as_json = np.array([d["embedding"] for d in got["data"]])
            assert raw.shape == want.shape and as_json.shape == want.shape
            np.testing.assert_allclose(as_json, raw.astype(np.float64), rtol=1e-6)  # decimal
            # the served floats may differ from encode's in the last bit (other batches):
            # a bucket or a float16 rounding can move by one step, never more
            tol = {"binary": 0, "int8": 1, "float16": 1e-3}[dtype]
            np.testing.assert_allclose(raw.astype(np.float64), want.astype(np.float64),
                                       atol=tol, rtol=0)
        # the OpenAI route ignores the server's --output-dtype (ubinary here): the openai
        # client decodes base64 as float32 (it got 192 garbage floats of float16 bytes)
        for fmt in ("base64", "float"):
            r = client.post("/v1/embeddings", json={"input": TEXTS[:2], "encoding_format": fmt})
            assert r.headers["x-output-dtype"] == "float32"
            got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4")
                            if fmt == "base64" else np.array(d["embedding"], np.float32)
                            for d in r.json()["data"]])
            np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
            assert (got * unit).sum(1).min() >= 0.99999
        r = client.post("/v1/embeddings", json={"input": "x", "output_dtype": "float16"})
        assert r.headers["x-output-dtype"] == "float16"
        tei = client.post("/embed", json={"inputs": TEXTS[:2], "normalize": False}).json()
        np.testing.assert_array_equal(np.array(tei), quantize_embeddings(ref, "ubinary"))
        r = client.post("/v1/embeddings", json={"input": "x", "output_dtype": "int4"})
        assert r.status_code == 422 and r.json()["error"]["param"] == "output_dtype"
        r = client.post("/v1/embeddings", json={"input": "x", "output_dtype": "uint8",
                                                "dimensions": 8})
        assert r.status_code == 422 and "ranges are for" in r.json()["error"]["message"]
    with app_for({"tiny": tiny_bert_bundle}) as (client, _):
        r = client.post("/v1/embeddings", json={"input": "x", "output_dtype": "int8"})
        assert r.status_code == 422 and "--output-ranges" in r.json()["error"]["message"]


@pytest.mark.parametrize("aborting", [False, True])
def test_a_request_cancelled_at_the_graceful_timeout_gets_json_503(tiny, aborting):
    """uvicorn cancels what is still running when --graceful-timeout ends (a request
    reading its body or tokenizing, which abort_in_flight cannot fail): once the server is
    aborting, that request answers TEI's JSON 503, not uvicorn's plain-text 500; any other
    cancel propagates."""
    import asyncio

    from angle_rt.serve.app import FrontDoor

    _, state = tiny
    sent: list[dict] = []

    async def stuck(scope, receive, send):
        await asyncio.Event().wait()

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def drive():
        scope = {"type": "http", "path": "/embed", "headers": [], "method": "POST"}
        task = asyncio.ensure_future(FrontDoor(stuck, state)(scope, receive, send))
        await asyncio.sleep(0.01)
        state.aborting = aborting
        task.cancel()
        return await asyncio.gather(task, return_exceptions=True)

    def count(code: str) -> float:
        return state.metrics.requests.labels("/embed", code)._value.get()

    before = count("499"), count("500")
    try:
        (outcome,) = asyncio.run(drive())
    finally:
        state.aborting = False
    if not aborting:  # the client went away (Ray cancels the task): 499, it was logged 500
        assert isinstance(outcome, asyncio.CancelledError) and not sent
        assert (count("499"), count("500")) == (before[0] + 1, before[1])
        return
    assert outcome is None and sent[0]["status"] == 503
    body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert body["error_type"] == "Unhealthy" and "graceful-timeout" in body["error"]


def test_small_bodies_tokenize_on_the_loop_large_ones_on_the_pool(tiny, enc, monkeypatch):
    """A one-sentence request is parsed and tokenized on the event loop (a thread hop each
    way cost more than the work); a body past INLINE_BYTES goes to the tokenizer pool, so
    it cannot stall other requests. Same vectors either way."""
    from angle_rt.serve import app as app_module

    client, state = tiny
    hops = []
    submit = state.tokenizer_pool.submit

    def counted(fn, *args, **kwargs):
        hops.append(getattr(fn, "__name__", str(fn)))
        return submit(fn, *args, **kwargs)

    monkeypatch.setattr(state.tokenizer_pool, "submit", counted)
    small = client.post("/embed", json={"inputs": TEXTS[:1], "normalize": False})
    assert small.status_code == 200 and hops == []
    many = TEXTS[:1] * (app_module.INLINE_BYTES // len(TEXTS[0]) + 1)
    large = client.post("/embed", json={"inputs": many, "normalize": False})
    assert large.status_code == 200 and hops == ["parse_tei_embed", "rows"]
    assert large.json()[0] == small.json()[0]
    same_bits(small.json(), enc.encode(TEXTS[:1]))


def test_an_unexpected_error_in_a_direct_route_is_a_json_500_without_internals(tiny,
                                                                                monkeypatch):
    """The embedding routes bypass Starlette's exception layers: their own catch-all answers
    like the app's (logged cause, no backend text), in each route's error shape."""
    client, state = tiny

    def boom(*args, **kwargs):
        raise RuntimeError("secret /srv/models/x")

    monkeypatch.setattr(state.models["tiny"], "finish", boom)
    for path, body in [("/v1/embeddings", {"input": ["x"]}), ("/embed", {"inputs": ["x"]})]:
        r = client.post(path, json=body)
        assert r.status_code == 500 and "secret" not in r.text and "/srv" not in r.text
        assert r.headers["x-request-id"]
        shape = r.json()
        assert (shape["error"]["code"] == "internal_error" if path.startswith("/v1")
                else shape["error_type"] == "Backend")


def _receive_after(messages: list[dict], then_disconnect_after: float | None = None):
    """An ASGI receive: `messages`, then (after a delay) http.disconnect, or never."""
    import asyncio

    queue = list(messages)

    async def receive():
        if queue:
            return queue.pop(0)
        if then_disconnect_after is None:
            await asyncio.Event().wait()
        await asyncio.sleep(then_disconnect_after)
        return {"type": "http.disconnect"}
    return receive


def test_settle_wakes_on_the_result_the_deadline_or_a_disconnect_and_cancels_the_rest():
    import asyncio
    import threading
    from concurrent.futures import Future

    from angle_rt.serve.app import _settle

    async def case(timeout, disconnect_after=None, result_after=None):
        future: Future = Future()
        if result_after is not None:
            threading.Timer(result_after, future.set_result, ["vectors"]).start()
        gone = await _settle(future, _receive_after([], disconnect_after), timeout)
        return gone, future

    gone, fut = asyncio.run(case(5.0, result_after=0.02))
    assert not gone and fut.result() == "vectors"
    gone, fut = asyncio.run(case(0.05))  # the deadline: its inputs are dropped
    assert not gone and fut.cancelled()
    gone, fut = asyncio.run(case(5.0, disconnect_after=0.02))
    assert gone and fut.cancelled()
    done: Future = Future()
    done.set_result("vectors")  # done by the deadline: the vectors, not a 504
    assert asyncio.run(_settle(done, _receive_after([]), 0.0)) is False
    assert done.result() == "vectors"

    async def cancelled_from_outside():
        future: Future = Future()
        task = asyncio.ensure_future(_settle(future, _receive_after([]), 5.0))
        await asyncio.sleep(0.01)
        task.cancel()
        outcome = await asyncio.gather(task, return_exceptions=True)
        return outcome, future

    (outcome,), fut = asyncio.run(cancelled_from_outside())
    assert isinstance(outcome, asyncio.CancelledError) and fut.cancelled()


def test_read_body_joins_chunks_stops_at_the_limit_and_sees_a_disconnect():
    import asyncio

    from angle_rt.serve.app import ClientGone, _read_body
    from angle_rt.serve.protocol import ApiError

    def chunks(*parts: bytes, end: bool = True) -> list[dict]:
        return [{"type": "http.request", "body": p,
                 "more_body": not (end and k == len(parts) - 1)} for k, p in enumerate(parts)]

    read = asyncio.run
    assert read(_read_body(_receive_after(chunks(b'{"in', b'put": ', b'"x"}')), 100)) \
        == b'{"input": "x"}'
    assert read(_read_body(_receive_after(chunks(b"")), 100)) == b""
    with pytest.raises(ApiError) as err:
        read(_read_body(_receive_after(chunks(b"x" * 60, b"x" * 60)), 100))
    assert err.value.status == 413
    with pytest.raises(ClientGone):
        read(_read_body(_receive_after(chunks(b"{", end=False), 0.0), 100))


@pytest.mark.parametrize("native", [True, False])
def test_within_times_out_with_and_without_asyncio_timeout(native, monkeypatch):
    """Python 3.10 has no asyncio.timeout: the body read falls back to wait_for, alike."""
    import asyncio

    from angle_rt.serve import app as app_mod

    if not native:
        monkeypatch.setattr(app_mod, "_TIMEOUT", None)
    elif app_mod._TIMEOUT is None:
        pytest.skip("this Python has no asyncio.timeout")

    async def slow(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "body"

    assert asyncio.run(app_mod._within(1.0, slow(0.0))) == "body"
    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(app_mod._within(0.01, slow(5.0)))


def test_a_utf16_body_is_refused_like_any_non_utf8_one(tiny):
    """json.loads(bytes) detects UTF-16/32, so such a body was embedded (200) where the
    documented answer is 400 `invalid_body`."""
    client, _ = tiny
    for encoding in ("utf-16", "utf-32"):
        r = client.post("/v1/embeddings", content=json.dumps({"input": "a"}).encode(encoding),
                        headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_body"


def test_tokenize_past_the_token_limit_counts_as_a_rejection(tiny_bert_bundle):
    with app_for({"tiny": tiny_bert_bundle}, max_request_tokens=20) as (client, state):
        before = state.metrics.rejections.labels("request_tokens")._value.get()
        r = client.post("/tokenize", json={"inputs": "word " * 40})
        assert r.status_code == 413
        assert state.metrics.rejections.labels("request_tokens")._value.get() == before + 1
