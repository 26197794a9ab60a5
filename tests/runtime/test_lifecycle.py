"""Opening and closing: what close() releases, what a closed Encoder says, flat memory."""

import threading
import time
import warnings

import numpy as np
import pytest

import angle_rt.session as sessions
from angle_rt import ClosedError, Encoder


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def test_with_block_closes_and_a_closed_encoder_says_so(tiny_bert_bundle):
    with Encoder(tiny_bert_bundle) as enc:
        v = enc.encode(["open"])
        assert not enc.closed
    assert enc.closed and enc.session._sess is None
    with pytest.raises(ClosedError, match="was closed; open a new one"):
        enc.encode(["closed"])
    with pytest.raises(ClosedError):
        next(enc.encode_iter(["closed"]))
    enc.close()  # idempotent
    with Encoder(tiny_bert_bundle) as again:
        np.testing.assert_array_equal(again.encode(["open"]), v)


def test_close_waits_for_running_encodes(tiny_bert_bundle):
    enc = Encoder(tiny_bert_bundle)
    real_run, started = enc.session.run, threading.Event()

    def slow_run(ids, mask):
        started.set()
        time.sleep(0.3)
        return real_run(ids, mask)

    enc.session.run = slow_run
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("v", enc.encode(["in flight"])))
    worker.start()
    started.wait(5)
    enc.close()  # must not pull the session from under the running call
    worker.join()
    assert result["v"].shape == (1, enc.dim)
    with pytest.raises(ClosedError):
        enc.encode(["late"])


@pytest.mark.parametrize("cycles", [200, pytest.param(1000, marks=pytest.mark.slow)])
def test_opening_and_closing_encoders_leaves_rss_flat(tiny_bert_bundle, cycles):
    def cycle(n):
        for _ in range(n):
            with Encoder(tiny_bert_bundle, intra_op_threads=1) as enc:
                enc.encode(["open, encode, close"])

    cycle(50)  # allocator pools and caches reach their steady state
    before = _rss_mb()
    cycle(cycles)
    grown = _rss_mb() - before
    # an Encoder holds ~8 MB here (tiny model, ORT session, tokenizer): leaked ones would add
    # over a gigabyte; a few MB is allocator noise
    assert grown < 20, f"RSS grew {grown:.1f} MB over {cycles} open/close cycles"


def test_auto_warns_when_a_gpu_goes_unused(tiny_bert_bundle, monkeypatch):
    monkeypatch.setattr(sessions, "gpu_visible", lambda: True)
    with pytest.warns(RuntimeWarning, match="no CUDA execution provider; running on CPU"):
        enc = Encoder(tiny_bert_bundle)
    assert enc.session.name == "onnxruntime-cpu"
    monkeypatch.setattr(sessions, "gpu_visible", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no GPU: nothing was given up, nothing to say
        Encoder(tiny_bert_bundle)
        Encoder(tiny_bert_bundle, backend="cpu")
