"""The server under faults and hostile clients: deadlines (504), health probes (503), slow
uploads (408, no slot held), per-request token cap (413), and the wire details TEI and
OpenAI clients rely on (Content-Type, auth scheme, error shapes, token arrays, truncation
direction, nothing internal in errors or /info)."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

from angle_rt import Encoder
from tests.serve.conftest import same_bits, serve
from tests.serve.test_app import app_for


@pytest.fixture
def blocking(tiny_bert_bundle):
    """An app on the tiny bundle whose model calls can be made to block or fail: yields
    (client, state, gate, fail) — clear `gate` to block batches, set `fail` to make them
    raise."""
    with app_for({"tiny": tiny_bert_bundle}, request_timeout=1.0,
                 max_request_tokens=300) as (client, state):
        batcher = state.models["tiny"].batcher
        real, gate, fail = batcher._run_batch, threading.Event(), threading.Event()
        gate.set()

        def run(rows):
            if not gate.wait(30):
                raise TimeoutError("test gate never opened")
            if fail.is_set():
                raise RuntimeError("secret backend detail /srv/model.onnx")
            return real(rows)

        batcher._run_batch = run
        try:
            yield client, state, gate, fail
        finally:
            gate.set()


def test_a_request_past_its_deadline_gets_504_and_its_inputs_are_dropped(blocking):
    client, state, gate, _ = blocking
    gate.clear()  # the model hangs
    t = time.monotonic()
    r = client.post("/v1/embeddings", json={"input": ["stuck"]})
    assert r.status_code == 504 and 0.9 <= time.monotonic() - t < 10
    assert r.json()["error"]["code"] == "timeout"
    queued = client.post("/embed", json={"inputs": ["also stuck"]})  # queued behind it
    assert queued.status_code == 504 and queued.json()["error_type"] == "Backend"
    assert state.models["tiny"].batcher.queued_items == 0  # dropped, not left to run
    gate.set()
    assert client.post("/embed", json={"inputs": ["fine"]}).status_code == 200
    metrics = client.get("/metrics").text
    assert 'angle_rt_rejections_total{reason="request_timeout"} 2.0' in metrics


def test_the_deadline_covers_tokenizing_a_large_body(blocking, monkeypatch):
    """A large body tokenizes on the pool, where it may wait behind other large ones: it
    once got its 504 only after that (6 s past a 1 s --request-timeout)."""
    client, state, _, _ = blocking
    model = state.models["tiny"]
    real = model.rows

    def slow(*args):
        time.sleep(3)
        return real(*args)

    monkeypatch.setattr(model, "rows", slow)
    t = time.monotonic()
    r = client.post("/embed", json={"inputs": ["word " * 1_000]})  # 5 KB: off the loop
    assert r.status_code == 504 and time.monotonic() - t < 2.5
    assert r.json()["error_type"] == "Backend"
    monkeypatch.setattr(model, "rows", real)
    assert client.post("/embed", json={"inputs": ["word " * 1_000]}).status_code == 200


def test_health_is_503_while_the_backend_fails_or_hangs_and_200_again_after(blocking,
                                                                            monkeypatch):
    from angle_rt.serve import app as app_mod

    client, _, gate, fail = blocking
    monkeypatch.setattr(app_mod, "HEALTH_FRESH_S", 0.0)  # always probe when idle
    assert client.get("/health").json() == {"status": "ok"}
    fail.set()
    r = client.get("/health")
    assert r.status_code == 503
    assert r.json()["models"]["tiny"] == "a probe failed (RuntimeError)"
    err = client.post("/v1/embeddings", json={"input": ["x"]})
    assert err.status_code == 500 and "secret" not in err.text and "/srv" not in err.text
    fail.clear()
    assert client.get("/health").status_code == 200
    gate.clear()  # a batch that never returns: busy, then stuck past the request timeout
    threading.Thread(target=client.post, args=("/embed",),
                     kwargs={"json": {"inputs": ["hang"]}}, daemon=True).start()
    time.sleep(1.5)
    r = client.get("/health")
    assert r.status_code == 503 and "running for" in r.json()["models"]["tiny"]
    gate.set()
    time.sleep(0.2)
    assert client.get("/health").status_code == 200


def test_token_cap_content_type_flat_ids_and_left_truncation(blocking, tiny_bert_bundle):
    client, _, _, _ = blocking
    too_many = client.post("/embed", json={"inputs": ["word " * 60] * 6})  # 6 × 62 > 300
    assert too_many.status_code == 413
    assert too_many.json()["error_type"] == "Validation"
    assert "--max-request-tokens" in too_many.json()["error"]
    r = client.post("/v1/embeddings", content=json.dumps({"input": "x"}),
                    headers={"content-type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    ids = [101] + [2000] * 250 + [102]  # one token array, longer than 2 × max_client…
    flat = client.post("/v1/embeddings", json={"input": ids, "encoding_format": "float"})
    assert flat.status_code == 200 and len(flat.json()["data"]) == 1
    with Encoder(tiny_bert_bundle) as enc:
        tok = enc.tokenizer.backend
        text = " ".join(f"w{i}" for i in range(100))
        tail = tok.encode(text).ids[-40:-1]  # the text's last tokens, before [SEP]
        left = client.post("/tokenize", json={"inputs": text, "truncate": True})
        assert left.status_code == 200
        emb = client.post("/embed", json={"inputs": text, "truncation_direction": "Left",
                                          "normalize": False})
        assert emb.status_code == 200
        row = [tok.token_to_id("[CLS]"), *tok.encode(text).ids[-63:-1],
               tok.token_to_id("[SEP]")]
        same_bits(emb.json()[0], enc.run_batch([row])[0])
        assert row[-40:-1] == tail
    info = client.get("/info").json()
    assert not str(info["source"]).startswith("/")


def test_lowercase_bearer_and_tei_error_shape(tiny_bert_bundle):
    with app_for({"tiny": tiny_bert_bundle}, api_key="k-1") as (client, _):
        ok = client.post("/embed", json={"inputs": "x"}, headers={"authorization": "bearer k-1"})
        assert ok.status_code == 200
        bad = client.post("/embed", json={"inputs": "x"}, headers={"authorization": "Bearer no"})
        assert bad.status_code == 401 and set(bad.json()) == {"error", "error_type"}
        oa = client.post("/v1/embeddings", json={"input": "x"})
        assert oa.status_code == 401 and set(oa.json()["error"]) == {"message", "type",
                                                                     "param", "code"}


def _partial_upload(url: str) -> socket.socket:
    """A socket that announced a 1,000-byte JSON body and sent 10 bytes of it."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    s = socket.create_connection((host, port), timeout=30)
    s.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 1000\r\n\r\n" + b'{"inputs":')
    return s


def test_slow_uploads_hold_no_slot_and_get_408(tiny_bert_bundle, tmp_path):
    with serve(tmp_path, str(tiny_bert_bundle), "--served-model-name", "tiny",
               "--max-concurrent-requests", "2", "--body-timeout", "2") as server:
        slow = [_partial_upload(server.url) for _ in range(4)]
        time.sleep(0.3)
        for _ in range(3):  # 4 stalled uploads, 2 slots: every complete request still runs
            r = httpx.post(f"{server.url}/embed", json={"inputs": ["hello"]}, timeout=30)
            assert r.status_code == 200
        for s in slow:
            reply = b""
            while chunk := s.recv(4096):  # the server closes the connection after it
                reply += chunk
            s.close()
            head, _, body = reply.decode().partition("\r\n\r\n")
            assert head.startswith("HTTP/1.1 408"), head
            assert json.loads(body)["error_type"] == "Validation"


def _reply(s: socket.socket) -> bytes:
    """What the server sends until it closes the connection."""
    reply = b""
    while chunk := s.recv(65536):
        reply += chunk
    s.close()
    return reply


def test_request_heads_have_a_deadline_and_a_size_cap(tiny_bert_bundle, tmp_path):
    """uvicorn timed out only idle keep-alive connections: a socket that sent nothing, or a
    head that never ended, was held forever, and 200 MB of header lines took 200 MB; a
    request the HTTP parser refused was answered in plain text."""
    with serve(tmp_path, str(tiny_bert_bundle), "--served-model-name", "tiny",
               "--body-timeout", "2") as server:
        host, port = urlsplit(server.url).hostname, urlsplit(server.url).port
        idle = socket.create_connection((host, port), timeout=30)
        partial = socket.create_connection((host, port), timeout=30)
        partial.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n")
        huge = socket.create_connection((host, port), timeout=10)
        huge.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n"
                     + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 4096) for i in range(24)))
        start = time.monotonic()
        assert _reply(idle) == b""  # closed, as an idle keep-alive connection is
        assert time.monotonic() - start < 6
        head, _, body = _reply(partial).decode().partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 408") and json.loads(body)["error"]["code"] == \
            "request_timeout"
        bad = socket.create_connection((host, port), timeout=10)
        bad.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
        head, _, body = _reply(bad).decode().partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 400") and json.loads(body)["error"]["code"] == \
            "invalid_request"  # JSON, as every API error (uvicorn's was plain text)
        # a head and a large body in one write: the body is no part of the head
        body = json.dumps({"inputs": "word " * 30_000}).encode()
        big = socket.create_connection((host, port), timeout=30)
        big.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        assert _reply(big).startswith(b"HTTP/1.1 200")
        # a keep-alive client that sends its requests in time is served, pipelined too
        ok = socket.create_connection((host, port), timeout=30)
        req = (b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: 16\r\n\r\n{\"inputs\": \"hi\"}")
        ok.sendall(req + req)
        time.sleep(0.3)
        ok.sendall(req[:20])
        time.sleep(0.3)
        ok.sendall(req[20:] + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answers = _reply(ok).split(b"HTTP/1.1 ")[1:]
        assert [a[:3] for a in answers] == [b"200"] * 4
        kept = socket.create_connection((host, port), timeout=30)
        kept.sendall(req)  # then idle: closed after its answer, with no 408 of its own
        assert [a[:3] for a in _reply(kept).split(b"HTTP/1.1 ")[1:]] == [b"200"]
        # answered 431 and closed (or reset, if the rest was still unread)
        with contextlib.suppress(ConnectionResetError):
            assert _reply(huge).startswith(b"HTTP/1.1 431")
    refused = [json.loads(line) for line in server.log.read_text().splitlines()
               if "request head refused" in line]
    assert sorted(r["status"] for r in refused) == [408, 431]


@pytest.mark.parametrize("forced", [False, True])
def test_graceful_timeout_answers_json_503_and_exits_nonzero(forced, tiny_bert_bundle,
                                                             tmp_path):
    """Cut requests answer a JSON 503 and the exit is 1: when --graceful-timeout runs out,
    and on a second Ctrl-C (uvicorn's force quit once cancelled them into plain-text 500s
    and the server logged a clean stop, exit 0)."""
    with serve(tmp_path, str(tiny_bert_bundle), "--served-model-name", "tiny",
               "--graceful-timeout", "30" if forced else "1", "--max-batch-size", "1",
               "--max-concurrent-requests", "8",
               "--max-queued-tokens", "4194304") as server:
        results: list[httpx.Response] = []

        def big() -> None:
            body = {"inputs": [f"sentence number {i} " * 32 for i in range(2048)]}
            results.append(httpx.post(f"{server.url}/embed", json=body, timeout=60))

        threads = [threading.Thread(target=big) for _ in range(8)]
        for t in threads:
            t.start()
        time.sleep(1.0)  # in flight: 16,384 one-input batches queued
        server.proc.send_signal(signal.SIGTERM)
        if forced:
            time.sleep(0.5)
            server.proc.send_signal(signal.SIGINT)
        for t in threads:
            t.join(60)
        assert server.proc.wait(30) == 1  # requests were cut: not a clean exit
        assert results and all(r.status_code in (200, 503) for r in results)
        cut = [r for r in results if r.status_code == 503]
        assert cut and all(r.json()["error_type"] == "Unhealthy" for r in cut)
        assert '"aborted"' in server.log.read_text()


def test_character_cap_never_loses_content(tiny_bert_bundle):
    """The tokenizer reads max_length × 32 characters of a text; text spread out by runs of
    whitespace once lost what lay past them: a 200 with the vector of "" under
    --no-truncate (not the 422, nor the text's own vector), and with left truncation the
    vector of the trailing spaces. The cap may only drop tokens truncation drops too."""
    words = " ".join(f"w{i}" for i in range(100))  # 100 tokens, over max_length 64
    sparse = " " * 5_000 + "a short sentence"  # 5 tokens, past the 2,048-character cap
    with Encoder(tiny_bert_bundle) as enc, \
            app_for({"tiny": tiny_bert_bundle}, truncate=False,
                    max_request_tokens=300) as (client, _):
        tok = enc.tokenizer.backend
        assert enc.tokenize([sparse], None)[0] == tok.encode(sparse).ids
        r = client.post("/embed", json={"inputs": sparse, "normalize": False})
        assert r.status_code == 200
        same_bits(r.json()[0], enc.encode([sparse])[0])
        assert not np.allclose(r.json()[0], enc.encode([""])[0], atol=1e-3)
        long = client.post("/embed", json={"inputs": " " * 5_000 + words})
        assert long.status_code == 422
        assert "max_length" in long.json()["error"]
        left = client.post("/embed", json={"inputs": words + " " * 5_000, "truncate": True,
                                           "truncation_direction": "Left", "normalize": False})
        row = [tok.token_to_id("[CLS]"), *tok.encode(words).ids[-63:-1],
               tok.token_to_id("[SEP]")]
        same_bits(left.json()[0], enc.run_batch([row])[0])
        # no space near the cut: a word cut in two must not reach the kept tokens
        for n in range(101, 200, 11):
            unspaced = ("q" * n + ".") * (3 * 2048 // n)
            left = client.post("/embed", json={"inputs": unspaced, "truncate": True,
                                               "truncation_direction": "Left",
                                               "normalize": False})
            row = [tok.token_to_id("[CLS]"), *tok.encode(unspaced).ids[-63:-1],
                   tok.token_to_id("[SEP]")]
            same_bits(left.json()[0], enc.run_batch([row])[0])
        spans = client.post("/tokenize", json={"inputs": sparse, "truncate": True}).json()[0]
        assert [t["start"] for t in spans[1:-1]] == [5_000, 5_002, 5_008]
        # /tokenize reads texts whole: the token cap holds before an entry is built
        big = client.post("/tokenize", json={"inputs": "word " * 1_000})
        assert big.status_code == 413 and "--max-request-tokens" in big.json()["error"]
