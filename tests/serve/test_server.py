"""A real `angle-rt serve` subprocess on 127.0.0.1, called by the official openai client
and by httpx: vectors equal `Encoder.encode`, batching across clients, errors in OpenAI's
shape, 429 backpressure, SIGTERM drain."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from urllib.parse import urlsplit

import httpx
import numpy as np
import openai
import pytest

from angle_rt import Encoder
from tests.serve.conftest import API_KEY, error_of, same_bits, serve


@pytest.fixture(scope="module")
def sentences(stsb_test) -> list[str]:
    return list(dict.fromkeys(stsb_test.sentences))


@pytest.fixture(scope="module")
def minilm(minilm_precisions):
    with Encoder(minilm_precisions) as enc:
        assert enc.artifact.precision == "int8-dynamic"  # what the server runs by default
        yield enc


@pytest.fixture(scope="module")
def client(minilm_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{minilm_server.url}/v1", api_key=API_KEY, timeout=120,
                         max_retries=0)


def test_openai_client_base64_and_float_equal_encode(client, minilm, sentences):
    texts = sentences[:200]
    want = minilm.encode(texts, normalize_embeddings=True)  # OpenAI's vectors are unit
    default = client.embeddings.create(model="minilm", input=texts)  # the client asks base64
    floats = client.embeddings.create(model="minilm", input=texts, encoding_format="float")
    for resp in (default, floats):
        assert resp.model == "minilm" and resp.object == "list"
        assert [d.index for d in resp.data] == list(range(len(texts)))
        same_bits([d.embedding for d in resp.data], want)
    assert default.usage.prompt_tokens == default.usage.total_tokens > len(texts)
    one = client.embeddings.create(model="minilm", input=texts[0], user="u-1")
    same_bits(one.data[0].embedding, want[0])


def test_dimensions_cut_and_renormalize(client, minilm, sentences):
    texts = sentences[200:240]
    resp = client.embeddings.create(model="minilm", input=texts, dimensions=64)
    got = np.array([d.embedding for d in resp.data])
    want = minilm.encode(texts, truncate_dim=64, normalize_embeddings=True)
    assert got.shape == (40, 64)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    same_bits(got, want)


def test_token_array_input(client, minilm, sentences):
    texts = sentences[240:250]
    ids = minilm.tokenize(texts, None)
    want = minilm.encode(texts, normalize_embeddings=True)
    many = client.embeddings.create(model="minilm", input=ids, encoding_format="float")
    one = client.embeddings.create(model="minilm", input=ids[3])
    same_bits([d.embedding for d in many.data], want)
    same_bits(one.data[0].embedding, want[3])
    assert many.usage.prompt_tokens == sum(map(len, ids))


def test_2048_inputs_in_one_call_are_split_into_batches(client, minilm, minilm_server,
                                                        sentences):
    texts = sentences[:2048]
    before = minilm_server.metrics()
    resp = client.embeddings.create(model="minilm", input=texts)
    assert [d.index for d in resp.data] == list(range(2048))
    sample = np.random.default_rng(0).choice(2048, 48, replace=False)
    same_bits([resp.data[i].embedding for i in sample],
              minilm.encode([texts[i] for i in sample], normalize_embeddings=True))
    batches = (minilm_server.metrics()['angle_rt_batch_size_count{model="minilm"}']
               - before['angle_rt_batch_size_count{model="minilm"}'])
    assert batches >= 2048 / 32


def test_64_concurrent_clients_batched_and_in_order(minilm_server, minilm, sentences):
    texts, every = sentences[300:364], sentences[300:365]
    want = dict(zip(every, minilm.encode(every, normalize_embeddings=True), strict=True))
    key_1 = 'angle_rt_batch_size_bucket{le="1.0",model="minilm"}'
    key_n = 'angle_rt_batch_size_count{model="minilm"}'
    before = minilm_server.metrics()

    async def one_client(aclient: openai.AsyncOpenAI, i: int) -> None:
        first = await aclient.embeddings.create(model="minilm", input=[texts[i]])
        assert len(first.data) == 1
        same_bits(first.data[0].embedding, want[texts[i]])
        pair = [texts[i], sentences[301 + i]]  # two inputs: order must hold
        second = await aclient.embeddings.create(model="minilm", input=pair,
                                                 encoding_format="float")
        assert [d.index for d in second.data] == [0, 1]
        for d, text in zip(second.data, pair, strict=True):
            same_bits(d.embedding, want[text])

    async def main() -> None:
        async with openai.AsyncOpenAI(base_url=f"{minilm_server.url}/v1", api_key=API_KEY,
                                      timeout=120, max_retries=0) as aclient:
            await asyncio.gather(*(one_client(aclient, i) for i in range(64)))

    asyncio.run(main())
    after = minilm_server.metrics()
    batches = after[key_n] - before[key_n]
    singles = after[key_1] - before[key_1]
    assert batches < 192, "every input ran alone: no batching across requests"
    assert batches - singles > 0


def test_openai_errors_401_404_413(minilm_server, client):
    url = f"{minilm_server.url}/v1/embeddings"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{minilm_server.url}/v1", api_key="wrong",
                      max_retries=0).embeddings.create(model="minilm", input="x")
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": API_KEY}):
        r = httpx.post(url, json={"input": "x"}, headers=headers)
        assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
    assert httpx.get(f"{minilm_server.url}/health").status_code == 200  # open
    assert httpx.get(f"{minilm_server.url}/metrics").status_code == 200  # open

    with pytest.raises(openai.NotFoundError) as err:
        client.embeddings.create(model="text-embedding-3-small", input="x")
    assert err.value.status_code == 404
    r = httpx.post(url, json={"input": "x", "model": "nope"},
                   headers={"authorization": f"Bearer {API_KEY}"})
    e = error_of(r)
    assert r.status_code == 404 and e["param"] == "model" and "minilm" in e["message"]

    auth = {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    big = b'{"input": "' + b"a" * 2_100_000 + b'"}'
    r = httpx.post(url, content=big, headers=auth)
    assert r.status_code == 413 and error_of(r)["code"] == "payload_too_large"

    def chunks():  # no Content-Length: the limit holds while reading
        yield b'{"input": "'
        for _ in range(30):
            yield b"a" * 100_000
        yield b'"}'
    r = httpx.post(url, content=chunks(), headers=auth)
    assert r.status_code == 413
    # a 100k-character text is truncated, not refused (truncation is on here)
    r = httpx.post(url, json={"input": ["word " * 20_000, "short"]}, headers=auth, timeout=60)
    assert r.status_code == 200 and len(r.json()["data"]) == 2


BAD = [
    (b'{"input": ', 400, None),
    (b'{"input": "\xff\xfe"}', 400, None),
    (b'["not", "an", "object"]', 422, None),
    (b'{}', 422, "input"),
    (b'{"input": 5}', 422, "input"),
    (b'{"input": []}', 422, "input"),
    (b'{"input": ["a", 1]}', 422, "input"),
    (b'{"input": [[]]}', 422, "input"),
    (b'{"input": [1.5]}', 422, "input"),
    (b'{"input": ["ok", "\\ud800"]}', 422, "input"),
    (b'{"input": [1, 99999999]}', 422, "input"),
    (b'{"input": "a", "model": 3}', 422, "model"),
    (b'{"input": "a", "encoding_format": "binary"}', 422, "encoding_format"),
    (b'{"input": "a", "dimensions": 0}', 422, "dimensions"),
    (b'{"input": "a", "dimensions": -3}', 422, "dimensions"),
    (b'{"input": "a", "dimensions": 33}', 422, "dimensions"),
    (b'{"input": "a", "dimensions": true}', 422, "dimensions"),
    (b'{"input": "a", "prompt_name": "nope"}', 422, "prompt_name"),
    (b'{"input": "a", "prompt": "query: ", "prompt_name": "C"}', 422, "prompt_name"),
    (b'{"input": ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", '
     b'"p", "q"]}', 422, "input"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD)
def test_bad_input_is_a_clear_4xx_and_the_server_keeps_serving(tiny_server, body, status,
                                                               param):
    auth = {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    r = httpx.post(f"{tiny_server.url}/v1/embeddings", content=body, headers=auth)
    assert r.status_code == status, r.text
    assert error_of(r)["param"] == param
    ok = httpx.post(f"{tiny_server.url}/v1/embeddings", json={"input": "still here"},
                    headers=auth)
    assert ok.status_code == 200


def test_no_truncate_422_names_the_input_and_413_on_small_limit(tiny_server):
    auth = {"authorization": f"Bearer {API_KEY}"}
    url = f"{tiny_server.url}/v1/embeddings"
    r = httpx.post(url, json={"input": ["short", "word " * 100]}, headers=auth)
    e = error_of(r)
    assert r.status_code == 422 and e["code"] == "input_too_long" and "input[1]" in e["message"]
    r = httpx.post(url, json={"input": ["x" * 100_000]}, headers=auth)
    assert r.status_code == 413  # 64 KB limit on this server
    r = httpx.post(url, json={"input": ["y " * 15_000]}, headers=auth)
    assert r.status_code == 422 and "input[0]" in error_of(r)["message"]
    r = httpx.post(f"{tiny_server.url}/embed", json={"inputs": "word " * 100, "truncate": True},
                   headers=auth)
    assert r.status_code == 200 and len(r.json()[0]) == 32


def test_429_over_the_limits_with_retry_after(tiny_server, sentences):
    texts = sentences[:16]

    async def main() -> list:
        async with openai.AsyncOpenAI(base_url=f"{tiny_server.url}/v1", api_key=API_KEY,
                                      max_retries=0, timeout=60) as aclient:
            calls = [aclient.embeddings.with_raw_response.create(model="tiny", input=texts)
                     for _ in range(32)]
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(main())
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    served = [r for r in results if not isinstance(r, Exception)]
    assert refused and served and len(refused) + len(served) == 32, results
    for exc in refused:
        assert exc.status_code == 429
        assert int(exc.response.headers["retry-after"]) >= 1
        e = error_of(exc.response)
        assert e["type"] == "rate_limit_error" and e["code"] == "rate_limit_exceeded"
    for raw in served:
        assert len(raw.parse().data) == 16
    metrics = tiny_server.metrics()
    assert sum(v for k, v in metrics.items() if k.startswith("angle_rt_rejections_total")) \
        == len(refused)


def test_sigterm_finishes_requests_in_flight_then_exits_0(minilm_bundle, sentences, tmp_path):
    n, size = 8, 48
    with serve(tmp_path, str(minilm_bundle)) as server:
        async def main() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
                calls = [asyncio.ensure_future(http.post(
                    "/v1/embeddings", json={"input": sentences[i * size:(i + 1) * size]}))
                    for i in range(n)]
                deadline = time.monotonic() + 60
                while (server.metrics()["angle_rt_requests_in_flight"] < n
                       and not any(c.done() for c in calls)):
                    assert time.monotonic() < deadline, "the requests never got in flight"
                    await asyncio.sleep(0.02)
                server.proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*calls)

        responses = asyncio.run(main())
        assert [r.status_code for r in responses] == [200] * n
        assert all(len(r.json()["data"]) == size for r in responses)
        assert server.proc.wait(60) == 0
        msgs = [line["msg"] for line in server.log_lines()]
        assert "draining" in msgs and msgs[-1] == "stopped"


def test_a_disconnected_clients_inputs_are_dropped(minilm_server, sentences):
    body = json.dumps({"input": sentences[:2048]}).encode()
    head = (f"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
            f"{API_KEY}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
            "\r\n\r\n").encode()
    inputs, batches = 'angle_rt_inputs_total{model="minilm"}', \
        'angle_rt_batch_size_count{model="minilm"}'
    before = minilm_server.metrics()
    url = urlsplit(minilm_server.url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(head + body)
        _until(lambda: minilm_server.metrics()["angle_rt_requests_in_flight"] >= 1)
    _until(lambda: minilm_server.metrics()["angle_rt_requests_in_flight"] == 0)
    after = minilm_server.metrics()
    assert after.get(inputs, 0) == before.get(inputs, 0)  # it never completed
    assert after[batches] - before[batches] < 2048 / 32 / 2  # most inputs never ran
    assert any(line.get("status") == 499 for line in minilm_server.log_lines())


def _until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)
