"""`angle-rt serve --ray`: the same app as a Ray Serve deployment with 2 replicas on a local
Ray (127.0.0.1 only), called by the official openai client; a replica killed mid-load
loses no request a client can retry."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import numpy as np
import openai
import pytest

from angle_rt import Encoder
from tests.serve.conftest import same_bits, serve

pytest.importorskip("ray.serve")
pytestmark = pytest.mark.slow  # a Ray cluster, its Serve controller, proxy and 2 replicas


def _replica_pids() -> list[int]:
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"])
            if any("ServeReplica" in part for part in (p.info["cmdline"] or []))]


def test_two_replicas_serve_encode_vectors_and_survive_a_killed_replica(tiny_bert_bundle,
                                                                         stsb_test, tmp_path):
    texts = list(dict.fromkeys(stsb_test.sentences))[:400]
    with Encoder(tiny_bert_bundle) as enc:
        want = enc.encode(texts, normalize_embeddings=True)
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    with serve(tmp_path, f"tiny={tiny_bert_bundle}", "--ray", "--ray-replicas", "2",
               "--threads", "1", env=env, timeout=240) as server:
        info = httpx.get(f"{server.url}/info", timeout=30).json()
        assert info["model_id"] == "tiny"
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=60,
                               max_retries=5)  # the client's own retries (5xx, resets)
        deadline = time.monotonic() + 120
        while len(_replica_pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        pids = _replica_pids()
        assert len(pids) == 2, pids
        got: dict[int, np.ndarray] = {}
        errors: list[BaseException] = []

        def load(part: int) -> None:
            try:
                for k in range(part, len(texts), 4):
                    r = client.embeddings.create(model="tiny", input=texts[k])
                    got[k] = np.array(r.data[0].embedding, dtype=np.float32)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=load, args=(p,)) for p in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        os.kill(pids[0], signal.SIGKILL)  # one replica dies mid-load
        for t in threads:
            t.join(180)
        assert not errors, errors
        assert sorted(got) == list(range(len(texts)))
        same_bits(np.stack([got[k] for k in range(len(texts))]), want)
        deadline = time.monotonic() + 120  # Ray Serve replaces the dead replica
        while len(_replica_pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(_replica_pids()) == 2
        _sigterm_answers_what_is_in_flight(server, texts)


def _sigterm_answers_what_is_in_flight(server, texts: list[str]) -> None:
    """SIGTERM with requests running: the application is deleted while Ray's proxy stays
    up, so each is answered (Serve's full shutdown stopped the proxy at once and cut them),
    and the exit is clean."""
    long = [" ".join(texts[:40])] * 1500  # max_length rows: ≈ 1 s of one replica's thread
    codes: list[int] = []

    def heavy() -> None:
        try:
            codes.append(httpx.post(f"{server.url}/embed", json={"inputs": long},
                                    timeout=120).status_code)
        except httpx.HTTPError as exc:
            codes.append(type(exc).__name__)

    threads = [threading.Thread(target=heavy) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(150)
    assert codes == [200] * 8, codes
    assert server.proc.wait(150) == 0
    stopped = [line for line in server.log_lines() if line.get("msg") == "stopped"]
    assert stopped and stopped[-1]["clean"] is True


def test_a_port_other_than_a_running_serves_is_refused():
    """On a cluster where Serve runs already, serve.start keeps its proxy's HTTP options
    and only logs that ours are ignored: `--ray auto --port B` logged http://…:B while the
    proxy listened on its own port. Now another --port is refused, and without --port the
    running proxy's address is the one used."""
    import ray
    from ray import serve as ray_serve_api

    from angle_rt.serve.ray_serve import _free_port, _proxy_address, _start

    running = _free_port("127.0.0.1")
    other = next(p for p in iter(lambda: _free_port("127.0.0.1"), None) if p != running)
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        _start(ray_serve_api, "127.0.0.1", running, 30)
        _start(ray_serve_api, "127.0.0.1", other, 30)  # only a warning from Ray
        with pytest.raises(OSError, match=f"proxy on 127.0.0.1:{running}.*--port {running}"):
            _proxy_address("127.0.0.1", other, given=True)
        assert _proxy_address("127.0.0.1", other, given=False) == ("127.0.0.1", running)
        assert _proxy_address("127.0.0.1", running, given=True) == ("127.0.0.1", running)
    finally:
        ray_serve_api.shutdown()
        ray.shutdown()
