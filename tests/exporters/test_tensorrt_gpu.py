"""TensorRT engines on a real GPU: build, parity, concurrency. Skipped without one."""

import threading

import numpy as np
import pytest

from angle_rt import Encoder
from exporters import export
from exporters.engines import build_engines
from exporters.trt_build import BuildOptions
from exporters.verify import compare

pytestmark = [pytest.mark.gpu, pytest.mark.trt]


@pytest.fixture(scope="module")
def engine_bundle(minilm_dir, tmp_path_factory):
    bundle = export(minilm_dir, tmp_path_factory.mktemp("trt") / "minilm", fp16=True, int8=True)
    build_engines(bundle, ["fp16", "int8"], BuildOptions(max_batch=64, buckets=(32, 64, 128)))
    return bundle


@pytest.mark.parametrize(("precision", "threshold"), [("fp16", 0.999), ("int8", 0.98)])
def test_engine_parity_on_stsb(engine_bundle, stsb_test, precision, threshold):
    ref = Encoder(engine_bundle, precision="fp32", backend="cpu").encode(stsb_test.sentences)
    enc = Encoder(engine_bundle, precision=precision, backend="tensorrt")
    assert enc.session.name == "tensorrt"
    report = compare(ref, enc.encode(stsb_test.sentences, batch_size=64), threshold)
    assert report.passed, report


def test_concurrent_encodes_equal_serial(engine_bundle, stsb_test):
    enc = Encoder(engine_bundle, precision="fp16", backend="tensorrt")
    chunks = [stsb_test.sentences[i::8][:100] for i in range(8)]
    serial = [enc.encode(c) for c in chunks]
    out: dict[int, np.ndarray] = {}
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, enc.encode(chunks[i])))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        assert np.allclose(out[i], serial[i], atol=1e-3)
