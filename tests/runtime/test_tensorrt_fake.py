"""The TensorRT session, its context pool and the engine builder, run on CPU through fakes of
`tensorrt` and cuda-python that enforce the real APIs' contracts (tests/fake_tensorrt.py) and
compute with ONNX Runtime on the graph the engine was built from."""

import json
import shutil
import threading

import numpy as np
import pytest

from angle_rt import BundleError, ClosedError, Encoder
from angle_rt.batching import padded_width
from angle_rt.manifest import read_manifest
from angle_rt.profiles import choose_profile, sequence_profiles
from angle_rt.session.cuda_mem import CudaBuffers
from angle_rt.session.trt import TrtSession
from exporters.cli import main
from exporters.engines import build_engines
from exporters.invariance import InvarianceError
from exporters.texts import builtin_sentences
from exporters.trt_build import EngineBuildError
from exporters.verify import compare
from tests import fake_tensorrt
from tests.fake_tensorrt import ContractError

MAX_LENGTH = 100  # not a multiple of 8: the last profile ends where padding would overshoot
TEXTS = builtin_sentences()[:120] + [" ".join(builtin_sentences()[i:i + 40])
                                     for i in range(0, 400, 40)]


@pytest.fixture(scope="module")
def source_bundle(tiny_bert_dir, tmp_path_factory):
    from exporters import export

    return export(tiny_bert_dir, tmp_path_factory.mktemp("fake-trt") / "b", pooling="mean",
                  max_length=MAX_LENGTH, fp16=True, verify=False)


@pytest.fixture
def bundle(source_bundle, tmp_path):
    return shutil.copytree(source_bundle, tmp_path / "b")


@pytest.fixture
def trt(monkeypatch):
    return fake_tensorrt.install(monkeypatch)


@pytest.fixture(scope="module")
def expected(source_bundle):
    with Encoder(source_bundle, precision="fp32", backend="cpu") as enc:
        return enc.encode(TEXTS)


def _engines(bundle):
    return [a for a in read_manifest(bundle).artifacts if a.format == "tensorrt"]


def test_padding_stays_inside_the_profiles_for_every_max_length_and_bucket_list():
    for buckets in ((32, 64, 128, 256, 512), (30, 60, 90), (1, 7, 9), (100,), (13,)):
        for max_length in range(1, 300):
            profiles = sequence_profiles(max_length, 1, 8, 16, buckets)
            for longest in range(1, max_length + 1):
                width = padded_width(longest, 8, max_length)
                assert longest <= width <= max_length
                choose_profile(profiles, 16, width)  # raises if no profile fits


def test_build_records_flags_profiles_and_timing_cache(trt, bundle, tmp_path):
    from exporters.trt_build import BuildOptions

    cache = tmp_path / "timing.cache"
    opts = BuildOptions(max_batch=16, opt_batch=8, buckets=(32, 64), workspace_gb=1.5,
                        optimization_level=2, timing_cache=cache)
    [art] = build_engines(bundle, ["fp16"], opts)
    build = trt.builds[-1]
    assert build["flags"] == 1 << 5  # STRONGLY_TYPED on TensorRT 10
    assert build["source"] == "model.fp16.onnx" and build["optimization_level"] == 2
    assert build["workspace"] == int(1.5 * 2**30)
    assert [s["input_ids"] for s in build["profiles"]] == [
        ((1, 1), (8, 32), (16, 32)), ((1, 33), (8, 64), (16, 64)),
        ((1, 65), (8, MAX_LENGTH), (16, MAX_LENGTH))]
    assert build["timing_cache_entries"] == 0
    assert cache.read_bytes() == f"{trt.device_name}:1".encode()
    build_engines(bundle, ["fp16"], opts)  # the second build reads the cache the first wrote
    assert trt.builds[-1]["timing_cache_entries"] == 1
    assert art.parity["min_cosine"] >= 0.999 and art.engine["gpu_name"].startswith("Fake GPU")
    assert art.parity["batch_invariance"]["passed"]  # alone vs batched, recorded
    assert art.parity["batch_invariance"]["min_cosine"] >= 0.9999
    assert [a.file for a in _engines(bundle)] == ["engine.fp16.plan"]
    assert not list(bundle.glob(".*staging"))


def test_tensorrt_11_builds_without_the_flag(monkeypatch, bundle):
    trt = fake_tensorrt.install(monkeypatch, version="11.1.0.106")
    build_engines(bundle, ["fp32"])
    assert trt.builds[-1]["flags"] == 0


def test_full_length_batches_fit_the_last_profile(trt, bundle, expected):
    """max_length 100 padded to a multiple of 8 used to become 104 and leave every profile."""
    build_engines(bundle, ["fp32"])
    with Encoder(bundle, backend="tensorrt") as enc:
        assert enc.session.name == "tensorrt" and enc.session.max_width == MAX_LENGTH
        got = enc.encode(TEXTS)
    assert compare(expected, got, 0.99999).passed


def test_auto_prefers_the_gated_engine(trt, bundle, expected):
    build_engines(bundle, ["fp16"])
    with Encoder(bundle) as enc:
        assert enc.artifact.file == "engine.fp16.plan" and enc.session.name == "tensorrt"
        assert compare(expected, enc.encode(TEXTS), 0.999).passed


def test_profile_switching_and_batches_larger_than_the_engine(trt, bundle, expected):
    from exporters.trt_build import BuildOptions

    build_engines(bundle, ["fp32"], BuildOptions(max_batch=4, opt_batch=2, buckets=(16, 32)))
    with Encoder(bundle, backend="tensorrt") as enc:
        got = enc.encode(TEXTS, batch_size=32)  # batches of 32 split into engine batches of 4
    assert compare(expected, got, 0.99999).passed
    assert trt.stats["profile_switches"] >= 3


def test_engine_declared_int32_inputs_get_int32(trt, bundle, expected):
    trt.force_input_dtype = "INT32"
    build_engines(bundle, ["fp32"])
    with Encoder(bundle, backend="tensorrt") as enc:
        assert enc.session.input_dtype == np.int32
        assert compare(expected, enc.encode(TEXTS), 0.99999).passed


def test_contexts_share_a_profile_concurrently(trt, bundle):
    """Two threads with same-length batches run at the same time on two contexts."""
    build_engines(bundle, ["fp32"])
    trt.exec_delay = 0.2
    with Encoder(bundle, backend="tensorrt") as enc:
        texts = ["a sentence of some length"] * 4
        serial = enc.encode(texts)
        out = {}
        threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, enc.encode(texts)))
                   for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert enc.session.engine.peak_sharing == 2  # one profile, two contexts, same time
    for i in range(2):
        np.testing.assert_allclose(out[i], serial, atol=1e-6)


def test_close_releases_contexts_buffers_and_streams(trt, bundle):
    build_engines(bundle, ["fp32"])
    enc = Encoder(bundle, backend="tensorrt")
    assert trt.cuda.live() == {"device": 6, "host": 6, "streams": 2}  # 2 contexts × 3 tensors
    enc.encode(["warm"])
    enc.close()
    enc.close()  # twice is fine
    assert trt.cuda.live() == {"device": 0, "host": 0, "streams": 0}
    assert trt.stats["contexts_destroyed"] == trt.stats["contexts_created"]
    with pytest.raises(ClosedError, match="was closed"):
        enc.encode(["after close"])


@pytest.mark.parametrize("fail", [{"fail_malloc_after": 4}, {"fail_context_after": 1}])
def test_a_pool_failing_half_way_frees_what_it_made(monkeypatch, bundle, fail):
    trt = fake_tensorrt.install(monkeypatch)
    build_engines(bundle, ["fp32"])
    for key, value in fail.items():
        if key == "fail_malloc_after":
            trt.cuda.mallocs, trt.cuda.fail_malloc_after = 0, value
        else:
            trt.fail_context_after = trt.stats["contexts_created"] + value
    with pytest.raises((RuntimeError, BundleError)):
        TrtSession(bundle / "engine.fp32.plan", dim=32)
    assert trt.cuda.live() == {"device": 0, "host": 0, "streams": 0}
    assert trt.stats["contexts_destroyed"] == trt.stats["contexts_created"]


@pytest.mark.parametrize("failure", ["fail_build", "fail_execute", "corrupt_output"])
def test_build_engines_lists_nothing_that_failed(trt, bundle, failure):
    before = (bundle / "angle_rt.json").read_text()
    setattr(trt, failure, True)
    errors = {"fail_build": EngineBuildError, "fail_execute": RuntimeError,
              "corrupt_output": Exception}
    with pytest.raises(errors[failure]):
        build_engines(bundle, ["fp16"])
    assert (bundle / "angle_rt.json").read_text() == before
    assert not (bundle / "engine.fp16.plan").exists() and not list(bundle.glob(".*staging"))
    with Encoder(bundle) as enc:  # auto: no engine listed, so no engine used
        assert enc.session.name == "onnxruntime-cpu"


def test_an_engine_whose_rows_depend_on_their_batch_is_refused(trt, bundle):
    """Close enough to fp32 on whole batches, but a text's vector moves with its batch
    mates: the engine gate's invariance check refuses it and nothing is listed."""
    before = (bundle / "angle_rt.json").read_text()
    trt.cross_batch_leak = 0.03
    with pytest.raises(InvarianceError, match=r"engine\.fp16\.plan is not batch-invariant"):
        build_engines(bundle, ["fp16"])
    assert (bundle / "angle_rt.json").read_text() == before
    assert not (bundle / "engine.fp16.plan").exists()


def test_build_engine_cli_exit_codes(trt, bundle, capsys):
    trt.corrupt_output = True
    assert main(["build-engine", str(bundle), "--precision", "fp16"]) == 1
    assert "engine parity gate failed" in capsys.readouterr().err
    trt.corrupt_output, trt.fail_execute = False, True
    assert main(["build-engine", str(bundle), "--precision", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "execute_async_v3 failed" in err and "Traceback" not in err
    trt.fail_execute = False
    assert main(["build-engine", str(bundle), "--precision", "fp16"]) == 0
    assert "engine.fp16.plan: Fake GPU" in capsys.readouterr().out
    assert [a["file"] for a in json.loads((bundle / "angle_rt.json").read_text())["artifacts"]
            if a["format"] == "tensorrt"] == ["engine.fp16.plan"]


def test_engine_from_another_tensorrt_is_refused(monkeypatch, bundle):
    fake_tensorrt.install(monkeypatch)
    build_engines(bundle, ["fp32"])
    fake_tensorrt.install(monkeypatch, version="10.9.0.34")
    with pytest.raises(BundleError, match="could not deserialize"):
        TrtSession(bundle / "engine.fp32.plan", dim=32)
    with pytest.warns(RuntimeWarning, match=r"built with TensorRT 10\.8\.0\.43"):
        enc = Encoder(bundle)  # auto falls back to ONNX Runtime, saying why
    assert enc.session.name == "onnxruntime-cpu"


def test_cuda_buffers_contract(trt):
    mem = CudaBuffers({"x": 64, "y": 16}, {"x": np.int64, "y": np.float32})
    mem.upload("x", np.arange(8, dtype=np.int64))
    with pytest.raises(ValueError, match="do not fit"):
        mem.upload("x", np.arange(9, dtype=np.int64))
    mem.close()
    mem.close()
    assert trt.cuda.live() == {"device": 0, "host": 0, "streams": 0}


def test_fake_enforces_the_api(trt, bundle):
    """The fake is only worth its tests if misuse fails: no address, wrong stream, a context
    in two threads, shapes outside the selected profile, reading before synchronizing."""
    build_engines(bundle, ["fp32"])
    runtime = trt.Runtime(trt.Logger())
    engine = runtime.deserialize_cuda_engine((bundle / "engine.fp32.plan").read_bytes())
    ctx = engine.create_execution_context()
    cuda = trt.cuda
    mem = CudaBuffers({"input_ids": 64, "attention_mask": 64, "embedding": 128},
                      {"input_ids": np.int64, "attention_mask": np.int64,
                       "embedding": np.float32})
    stream = int(mem.stream)
    assert ctx.set_optimization_profile_async(0, stream)
    assert not ctx.set_input_shape("input_ids", (1, 33))  # profile 0 ends at 32
    assert ctx.set_input_shape("input_ids", (1, 8)) and ctx.set_input_shape("attention_mask",
                                                                            (1, 8))
    with pytest.raises(ContractError, match="before set_tensor_address"):
        ctx.execute_async_v3(stream)
    for name, ptr in mem.device.items():
        ctx.set_tensor_address(name, ptr)
    _, other = cuda.cudaStreamCreate()
    with pytest.raises(ContractError, match="selected on stream"):
        ctx.execute_async_v3(other)
    mem.upload("input_ids", np.full((1, 8), 7, np.int64))
    mem.upload("attention_mask", np.ones((1, 8), np.int64))
    assert ctx.execute_async_v3(stream) is True  # queued on the buffers' stream
    assert not mem.host["embedding"].any()  # nothing ran before synchronize
    got = mem.download("embedding", (1, 32))
    assert np.abs(got).sum() > 0
    ctx._busy.acquire()  # another thread is inside this context
    with pytest.raises(ContractError, match="two threads"):
        ctx.set_input_shape("input_ids", (1, 8))
    ctx._busy.release()
    mem.close()
    cuda.cudaStreamDestroy(other)


def test_engine_builds_from_a_graph_with_external_data(trt, tiny_bert_dir, tmp_path,
                                                       monkeypatch, expected):
    """A > 2 GB graph keeps its weights in `<name>.data` beside it: the builder parses it by
    path (`parse_from_file`, which resolves them), not from bytes. Tiny BERT stands in, with
    the inline limit lowered; the fake parser reads the weights from beside the path."""
    from exporters import bundle as bundle_mod
    from exporters import export
    from exporters.trt_build import BuildOptions

    monkeypatch.setattr(bundle_mod, "MAX_INLINE_BYTES", 10_000)
    b = export(tiny_bert_dir, tmp_path / "ext", pooling="mean", max_length=MAX_LENGTH,
               fp16=True, verify=False)
    assert (b / "model.fp16.onnx.data").is_file()
    [art] = build_engines(b, ["fp16"], BuildOptions(max_batch=16, opt_batch=8))
    assert trt.builds[-1]["source"] == "model.fp16.onnx"
    assert art.parity["min_cosine"] >= 0.999
    with Encoder(b / art.file) as enc:
        assert compare(expected, enc.encode(TEXTS), 0.999).passed


def test_engines_compute_fp32_as_fp32(trt, bundle):
    """TensorRT enables TF32 by default (10-bit mantissas in fp32 products on Ampere+): an
    fp32 engine, and the fp32 parts of every other, must be built with it cleared."""
    [art] = build_engines(bundle, ["fp32"])
    assert "TF32" not in trt.builds[-1]["builder_flags"]
    assert art.engine["tf32"] is False


def test_a_timing_cache_from_another_gpu_is_replaced(trt, bundle, tmp_path, caplog):
    """TensorRT refuses such a cache (set_timing_cache returns False): it was written back
    unchanged, so it never became this GPU's."""
    import logging

    from exporters.trt_build import BuildOptions, log

    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"Another GPU:7")
    with caplog.at_level(logging.WARNING, logger=log.name):
        build_engines(bundle, ["fp32"], BuildOptions(timing_cache=cache))
    assert trt.builds[-1]["timing_cache_entries"] == 0
    assert "made on another GPU" in caplog.text
    assert cache.read_bytes() == f"{trt.device_name}:1".encode()


def test_a_minimum_batch_over_one_is_refused_before_building(trt, bundle, capsys):
    """Such an engine could not run a lone text or a short last chunk, and its error advised
    a larger --max-batch."""
    from exporters.trt_build import BuildOptions

    with pytest.raises(ValueError, match="min_batch must be 1"):
        BuildOptions(min_batch=2)
    assert main(["build-engine", str(bundle), "--precision", "fp32", "--min-batch", "2"]) == 2
    assert "min_batch must be 1" in capsys.readouterr().err
    assert not trt.builds and not _engines(bundle)


@pytest.mark.parametrize(("dtypes", "dim", "problem"), [
    ({"embedding": "HALF"}, None, "output HALF"),
    ({"attention_mask": "INT32"}, None, "inputs INT64/INT32"),
    ({}, 7, "output width 32"),
])
def test_an_engine_with_other_io_is_refused(trt, bundle, dtypes, dim, problem):
    """The buffers are float32 `dim` wide with one id type: an engine declaring a HALF
    output, unlike input types or another width would be read as garbage or overrun them."""
    build_engines(bundle, ["fp32"], verify=False)
    plan = bundle / "engine.fp32.plan"
    if dtypes:
        trt.force_tensor_dtypes.update(dtypes)
        build_engines(bundle, ["fp32"], verify=False)
    width = read_manifest(bundle).embedding_dim
    with pytest.raises(BundleError, match=problem):
        TrtSession(plan, dim or width)
    trt.force_tensor_dtypes.clear()
    build_engines(bundle, ["fp32"], verify=False)
    TrtSession(plan, width).close()
