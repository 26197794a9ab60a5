"""Past 2 GB: every artifact's tensors in one external `.data` file beside it, checksummed,
loadable by ONNX Runtime and by a loader that resolves them from the graph's folder (the
way TensorRT's parse_from_file does). The fast test forces the external layout on a tiny
model; the slow one exports a random decoder just over 2 GiB in fp32."""

import json
import resource
import shutil
import time

import numpy as np
import pytest

import exporters.bundle as bundle_mod
from angle_rt import ChecksumError, Encoder
from angle_rt.manifest import ONNX_FILES
from exporters.bundle import check_external_data
from tests import fake_tensorrt

PRECISIONS = ("fp16", "bf16", "int8", "int8-dynamic")
TEXTS = ["a first sentence", "and a second, longer one to pad the batch", "x"]


def _check_bundle(bundle, ref, fp16_min_cos):
    """Each artifact: one `<file>.data`, checksummed, as readable as the graph; the
    TensorRT-source graphs parse from their path; each runs in ONNX Runtime (bf16 has no
    CPU kernels there: its layout and parse are checked, the gate records it)."""
    manifest = json.loads((bundle / "angle_rt.json").read_text())
    arts = {a["precision"]: a for a in manifest["artifacts"]}
    assert sorted(arts) == sorted(["fp32", *PRECISIONS])
    for precision, art in arts.items():
        assert art["file"] == ONNX_FILES[precision]
        assert [e["file"] for e in art["external_data"]] == [art["file"] + ".data"]
        data = bundle / (art["file"] + ".data")
        assert art["external_data"][0]["sha256"] == bundle_mod.sha256_file(data)
        assert data.stat().st_mode & 0o777 == (bundle / art["file"]).stat().st_mode & 0o777
        assert (bundle / art["file"]).stat().st_size < 10_000_000  # the graph alone
        check_external_data(bundle / art["file"])
        if precision in ("fp32", "fp16", "bf16", "int8"):  # TensorRT's inputs
            parser = fake_tensorrt.OnnxParser(fake_tensorrt.FakeNetwork(0), None)
            assert parser.parse_from_file(str(bundle / art["file"])), parser.errors
    got = {}
    for precision in arts:
        if precision == "bf16":
            continue
        with Encoder(bundle / ONNX_FILES[precision], backend="cpu") as enc:
            got[precision] = enc.encode(TEXTS)
        assert np.isfinite(got[precision]).all()
    cos = (ref * got["fp32"]).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(
        got["fp32"], axis=1)
    assert cos.min() > 0.99999
    f16 = got["fp16"]
    cos16 = (ref * f16).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(f16, axis=1)
    assert cos16.min() > fp16_min_cos
    return manifest


def test_every_artifact_can_live_in_external_data(tiny_bert_dir, tmp_path, monkeypatch):
    from angle_torch.model import AngleModel
    from exporters import export

    monkeypatch.setattr(bundle_mod, "MAX_INLINE_BYTES", 10_000)  # "2 GB" for a tiny model
    bundle = export(tiny_bert_dir, tmp_path / "b", pooling="mean", max_length=64,
                    verify=False, fp16=True, bf16=True, int8=True, int8_dynamic=True)
    ref = AngleModel.from_pretrained(tiny_bert_dir, pooling="mean", max_length=64).encode(TEXTS)
    _check_bundle(bundle, ref, 0.999)
    assert not list(bundle.glob(".calibrate-*"))  # calibration's temporary graph is gone
    # a damaged data file is caught by its checksum, a truncated one by the layout check
    broken = shutil.copytree(bundle, tmp_path / "broken")
    data = broken / "model.fp16.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match=r"model\.fp16\.onnx\.data"):
        Encoder(broken, precision="fp16")
    data.write_bytes(bytes(raw[:1000]))
    with pytest.raises(ValueError, match="ends at byte"):
        check_external_data(broken / "model.fp16.onnx")


def test_rebuilding_in_place_does_not_grow_the_data_file(tmp_path, tiny_bert_bundle,
                                                         monkeypatch):
    """onnx appends to an existing data file: a rebuild (the INT8 refinement search) must
    start it afresh."""
    import onnx

    monkeypatch.setattr(bundle_mod, "MAX_INLINE_BYTES", 10_000)
    path = tmp_path / "m.onnx"
    bundle_mod.save_onnx(onnx.load(str(tiny_bert_bundle / "model.onnx")), path)
    size = (tmp_path / "m.onnx.data").stat().st_size
    bundle_mod.save_onnx(onnx.load(str(tiny_bert_bundle / "model.onnx")), path)
    assert (tmp_path / "m.onnx.data").stat().st_size == size
    check_external_data(path)


@pytest.mark.slow
def test_decoder_over_2gb_exports_every_precision(tmp_path, shared_data):
    """A random Llama of 566M parameters (2.27 GB in fp32): torch.onnx writes its weights
    outside the protobuf; fp16, bf16, int8 Q/DQ and dynamic int8 follow, each gated."""
    from angle_torch.model import AngleModel
    from exporters import export
    from tests.tiny_models import build_random_llama

    model_dir = build_random_llama(tmp_path / "model", hidden_size=2048, num_layers=11,
                                   intermediate_size=5632)
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    assert weights > 2**31
    start = time.perf_counter()
    bundle = export(model_dir, tmp_path / "bundle", max_length=32, verify_size=24,
                    fp16=True, bf16=True, int8=True, int8_dynamic=True)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    ref = AngleModel.from_pretrained(model_dir, max_length=32).encode(TEXTS)
    manifest = _check_bundle(bundle, ref, 0.999)
    assert manifest["parity"]["n_texts"] == 24
    assert (bundle / "model.onnx.data").stat().st_size > 2**31
    print(f"\n2.27 GB decoder: export {wall:.0f} s, peak RSS {peak:.1f} GiB (this process)")
