"""Depth variants: a layer-cut export equals the torch model cut at the same layer, the
manifest lists and round-trips the variants, `Encoder(layers=)` picks one or says which
depths exist."""

import numpy as np
import pytest

from angle_rt import BundleError, Encoder
from angle_rt.manifest import read_manifest
from angle_torch.model import AngleModel
from exporters import export
from exporters.cli import main
from exporters.depth import cut_model
from exporters.texts import builtin_sentences
from exporters.verify import compare


@pytest.fixture(scope="module")
def depth_bundle(tiny_bert_dir, shared_data, tmp_path_factory):
    return export(tiny_bert_dir, tmp_path_factory.mktemp("depth") / "b", pooling="mean",
                  max_length=64, fp16=True, layers=(1,), dims=(16,),
                  sts_data=shared_data / "sts" / "stsb-dev.jsonl")


def test_cut_export_equals_the_torch_model_cut_at_that_layer(depth_bundle, tiny_bert_dir,
                                                             stsb_test):
    texts = stsb_test.sentences[:400] + builtin_sentences()[:100]
    full = AngleModel.from_pretrained(tiny_bert_dir, pooling="mean", max_length=64)
    ref = cut_model(full, 1).encode(texts)
    with Encoder(depth_bundle, layers=1, precision="fp32") as enc:
        assert enc.artifact.file == "model.L1.onnx" and enc.artifact.layers == 1
        report = compare(ref, enc.encode(texts), 0.99999)
    assert report.passed, report
    with Encoder(depth_bundle, precision="fp32") as enc:  # the default is the full depth
        assert enc.artifact.file == "model.onnx"
        assert not np.allclose(enc.encode(texts[:5]), ref[:5], atol=1e-3)
    assert full.backbone.config.num_hidden_layers == 2  # the source model is untouched


def test_depths_export_when_an_int8_artifact_needs_refining(tmp_path):
    """A refined artifact rewrites the manifest on disk; the next depth's gate still finds
    its own artifacts there (it found only the full model's: exit 2)."""
    from tests.tiny_models import build_tiny_bert

    model = build_tiny_bert(tmp_path / "wild", init_range=1.0)
    bundle = export(model, tmp_path / "b", pooling="mean", max_length=64, int8_dynamic=True,
                    layers=(1,))
    arts = {a.file: a for a in read_manifest(bundle).artifacts}
    assert set(arts) == {"model.onnx", "model.int8-dynamic.onnx", "model.L1.onnx",
                         "model.L1.int8-dynamic.onnx"}
    assert arts["model.int8-dynamic.onnx"].parity["kept_in_float"]  # it was refined
    with Encoder(bundle, layers=1, precision="int8-dynamic") as enc:
        assert enc.encode(["a short sentence"]).shape == (1, 32)


def test_manifest_lists_gated_scored_variants_and_round_trips(depth_bundle):
    manifest = read_manifest(depth_bundle)
    arts = {a.file: a for a in manifest.artifacts}
    assert {f: a.layers for f, a in arts.items()} == {
        "model.onnx": None, "model.fp16.onnx": None,
        "model.L1.onnx": 1, "model.L1.fp16.onnx": 1}
    for art in arts.values():
        assert art.parity["passed"] and set(art.parity["stsb_dev_by_dim"]) == {"16", "32"}
        assert art.parity["sentences_per_s"] > 0
    assert manifest.parity["depths"]["1"]["n_texts"] == manifest.parity["n_texts"]
    assert manifest.depths() == [1, None]
    with Encoder(depth_bundle) as enc:
        rows = enc.variants()
    assert [(r["layers"], r["precision"]) for r in rows] == [
        (1, "fp16"), (1, "fp32"), (None, "fp16"), (None, "fp32")]
    assert all(r["stsb_dev_by_dim"] for r in rows)


def test_missing_depths_are_refused_clearly(depth_bundle, tiny_bert_dir, tmp_path, capsys):
    with pytest.raises(BundleError, match=r"no artifacts cut at 3 layers \(depths: 1, full\)"):
        Encoder(depth_bundle, layers=3)
    with pytest.raises(ValueError, match="cut at 1 layers, not the requested 2"):
        Encoder(depth_bundle / "model.L1.onnx", layers=2)
    code = main(["--model", str(tiny_bert_dir), "-o", str(tmp_path / "b"), "-q",
                 "--layers", "2", "--no-verify"])
    assert code == 2 and "depths in 1..1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse: exit 2 with the usage
        main(["--model", str(tiny_bert_dir), "-o", str(tmp_path / "b"), "--layers", "x"])
    assert exc.value.code == 2 and "comma-separated integers" in capsys.readouterr().err


def test_no_verify_with_depths_prints_its_summary(tiny_bert_dir, shared_data, tmp_path, capsys):
    """Unverified variants still get their STS-B scores in `parity`: the summary read a
    parity figure that was not there (KeyError, exit 1 after the bundle was written)."""
    code = main(["--model", str(tiny_bert_dir), "-o", str(tmp_path / "b"), "--layers", "1",
                 "--no-verify", "--sts-data", str(shared_data / "sts" / "stsb-dev.jsonl")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "model.L1.onnx (fp32" in out and "not verified" in out
    assert read_manifest(tmp_path / "b").artifact("model.L1.onnx").parity
