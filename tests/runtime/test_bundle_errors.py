import json
import shutil

import pytest

from angle_rt import BundleError, BundleVersionError, ChecksumError, Encoder
from angle_rt.manifest import FORMAT_VERSION, MANIFEST_FILE, read_manifest


@pytest.fixture
def bundle(tiny_bert_bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bert_bundle, dst)
    return dst


def _edit_manifest(bundle, fn):
    path = bundle / MANIFEST_FILE
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_intact_bundle_loads_from_dir_and_files(bundle):
    for p in (bundle, bundle / "model.onnx", bundle / MANIFEST_FILE):
        assert Encoder(p).encode("hello").shape == (32,)


def test_missing_path(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        Encoder(tmp_path / "nope")


def test_directory_without_manifest(tmp_path):
    with pytest.raises(BundleError, match="not an angle_rt bundle"):
        Encoder(tmp_path)


def test_manifest_not_json(bundle):
    (bundle / MANIFEST_FILE).write_text("{ not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Encoder(bundle)


def test_manifest_missing_field(bundle):
    _edit_manifest(bundle, lambda d: d.pop("pooling"))
    with pytest.raises(BundleError, match="lacks pooling"):
        Encoder(bundle)


def test_manifest_bad_value(bundle):
    _edit_manifest(bundle, lambda d: d.update(padding_side="middle"))
    with pytest.raises(BundleError, match="padding_side 'middle'"):
        Encoder(bundle)


def test_bundle_from_newer_angle_rt(bundle):
    _edit_manifest(bundle, lambda d: d.update(format_version=FORMAT_VERSION + 1,
                                              writer="angle_rt 9.0"))
    with pytest.raises(BundleVersionError, match="upgrade angle_rt"):
        Encoder(bundle)


def test_edited_checksum(bundle):
    def flip(d):
        d["artifacts"][0]["sha256"] = "0" * 64
    _edit_manifest(bundle, flip)
    with pytest.raises(ChecksumError, match=r"model\.onnx does not match"):
        Encoder(bundle)


def test_truncated_onnx(bundle):
    data = (bundle / "model.onnx").read_bytes()
    (bundle / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ChecksumError, match="re-export"):
        Encoder(bundle)
    with pytest.raises(BundleError, match="could not load"):
        Encoder(bundle, verify_checksums=False)


def test_missing_onnx(bundle):
    (bundle / "model.onnx").unlink()
    with pytest.raises(BundleError, match="missing from the bundle"):
        Encoder(bundle)


def test_corrupt_tokenizer(bundle):
    (bundle / "tokenizer.json").write_text('{"version": "1.0", "model": 5}')
    with pytest.raises(ChecksumError, match=r"tokenizer\.json does not match"):
        Encoder(bundle)
    with pytest.raises(BundleError, match=r"not a valid tokenizer\.json"):
        Encoder(bundle, verify_checksums=False)


def test_unknown_artifact_and_precision(bundle):
    (bundle / "other.onnx").write_bytes(b"")
    with pytest.raises(BundleError, match="not an artifact of this bundle"):
        Encoder(bundle / "other.onnx")
    with pytest.raises(BundleError, match="no int8 ONNX artifact"):
        Encoder(bundle, precision="int8")


def test_manifest_records_the_contract(tiny_bert_bundle):
    m = read_manifest(tiny_bert_bundle)
    assert m.format_version == FORMAT_VERSION and m.architecture == "encoder"
    assert (m.pooling, m.max_length, m.embedding_dim, m.padding_side) == ("mean", 64, 32, "right")
    assert [t.name for t in m.inputs] == ["input_ids", "attention_mask"]
    assert m.outputs[0].name == "embedding"
    art = m.artifacts[0]
    assert (art.file, art.format, art.precision) == ("model.onnx", "onnx", "fp32")
    assert art.parity["passed"] and art.parity["n"] >= 1000
    assert m.parity["max_tokens"] == 64  # the gate reached max_length
