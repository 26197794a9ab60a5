"""The TensorRT path's logic, checked without a GPU: profiles, buffers, engine checks,
the fallback order and the CLI's advice."""

import dataclasses
import json
import shutil
import types
import warnings

import pytest

from angle_rt import BackendUnavailableError, BundleError, Encoder
from angle_rt.manifest import Artifact, read_manifest, sha256_file, write_manifest
from angle_rt.profiles import (
    ShapeProfile,
    buffer_bytes,
    choose_profile,
    max_shapes,
    sequence_profiles,
)
from angle_rt.session.cuda_mem import check, cuda_available
from angle_rt.session.trt import engine_problem, tensorrt_available
from exporters.cli import main
from exporters.engines import engine_targets
from exporters.trt_build import BuildOptions, network_flags


def test_profiles_cover_every_length_once():
    profiles = sequence_profiles(256, 1, 32, 128)
    assert [(p.min[1], p.max[1]) for p in profiles] == [(1, 32), (33, 64), (65, 128),
                                                        (129, 256)]
    assert all(p.opt == (32, p.max[1]) for p in profiles)
    for seq in range(1, 257):
        assert sum(p.fits(16, seq) for p in profiles) == 1
    assert [p.max[1] for p in sequence_profiles(512)] == [32, 64, 128, 256, 512]
    assert [p.max[1] for p in sequence_profiles(40, buckets=(64,))] == [40]
    with pytest.raises(ValueError, match="min_batch"):
        sequence_profiles(128, 4, 2, 8)


def test_profile_choice_takes_the_tightest_fit():
    profiles = sequence_profiles(512, 1, 32, 64)
    assert choose_profile(profiles, 1, 8) == 0
    assert choose_profile(profiles, 64, 33) == 1
    assert choose_profile(profiles, 3, 512) == 4
    overlapping = [ShapeProfile((1, 1), (8, 256), (64, 512)), ShapeProfile((1, 1), (8, 64),
                                                                             (64, 64))]
    assert choose_profile(overlapping, 8, 40) == 1
    with pytest.raises(BundleError, match="rebuild the engine with larger --max-batch"):
        choose_profile(profiles, 65, 10)
    with pytest.raises(BundleError, match="sequence 600"):
        choose_profile(profiles, 1, 600)


def test_buffers_are_sized_for_the_largest_profile():
    profiles = sequence_profiles(384, 1, 16, 96, buckets=(128, 256))
    assert max_shapes(profiles) == (96, 384)
    assert buffer_bytes(profiles, 1024, 4) == {"input_ids": 96 * 384 * 4,
                                               "attention_mask": 96 * 384 * 4,
                                               "embedding": 96 * 1024 * 4}
    round_trip = [ShapeProfile.from_dict(p.to_dict()) for p in profiles]
    assert round_trip == profiles


def test_cuda_results_are_unwrapped_or_raised():
    """cuda-python returns (error, values...): the error code decides, values come back."""
    assert check((0,)) is None
    assert check((0, 12345)) == 12345
    assert check((0, 1, 2)) == [1, 2]
    with pytest.raises(RuntimeError, match="CUDA error 2"):
        check((2, None))


def test_cuda_unavailable_says_why():
    reason = cuda_available()
    if reason is None:
        pytest.skip("a CUDA device is visible here")
    assert "cuda" in reason.lower()


def test_engine_compatibility_messages():
    built = {"tensorrt_version": "10.8.0.43", "gpu_name": "NVIDIA H100 80GB HBM3",
             "compute_capability": "9.0"}
    here = {"gpu_name": "NVIDIA H100 PCIe", "compute_capability": "9.0"}
    assert engine_problem(built, "10.8.0.43", here) is None  # same SM, same version
    msg = engine_problem(built, "10.9.0.34", here)
    assert "TensorRT 10.8.0.43" in msg and "TensorRT 10.9.0.34" in msg
    msg = engine_problem(built, "10.8.0.43", {"gpu_name": "NVIDIA A100", "compute_capability":
                                               "8.0"})
    assert "NVIDIA H100 80GB HBM3" in msg and "8.0" in msg


def test_strongly_typed_flag_by_version():
    flag = types.SimpleNamespace(STRONGLY_TYPED=5)
    trt10 = types.SimpleNamespace(__version__="10.8.0.43", NetworkDefinitionCreationFlag=flag)
    trt11 = types.SimpleNamespace(__version__="11.1.0.106", NetworkDefinitionCreationFlag=flag)
    assert network_flags(trt10) == 1 << 5 and network_flags(trt11) == 0


def test_build_options_make_profiles():
    opts = BuildOptions(opt_batch=8, max_batch=16, buckets=(16, 64))
    assert [p.to_dict() for p in opts.profiles(40)] == [
        {"min": [1, 1], "opt": [8, 16], "max": [16, 16]},
        {"min": [1, 17], "opt": [8, 40], "max": [16, 40]}]


@pytest.fixture
def bundle_with_engine(tiny_bert_bundle, tmp_path):
    """A real bundle plus an engine entry, as if copied from a GPU build machine."""
    dst = shutil.copytree(tiny_bert_bundle, tmp_path / "b")
    plan = dst / "engine.fp16.plan"
    plan.write_bytes(b"serialized elsewhere")
    manifest = read_manifest(dst)
    engine = Artifact(file=plan.name, format="tensorrt", precision="fp16",
                      sha256=sha256_file(plan), size_bytes=plan.stat().st_size,
                      engine={"tensorrt_version": "10.8.0.43", "gpu_name": "NVIDIA H100",
                              "compute_capability": "9.0",
                              "profiles": [p.to_dict() for p in sequence_profiles(64)]})
    write_manifest(dst, dataclasses.replace(manifest,
                                            artifacts=(*manifest.artifacts, engine)))
    return dst


@pytest.mark.skipif(tensorrt_available() is None, reason="this machine has TensorRT + GPU")
def test_fallback_order_without_tensorrt(bundle_with_engine, tiny_bert_bundle):
    with pytest.warns(RuntimeWarning, match="TensorRT engine not used .*falling back"):
        enc = Encoder(bundle_with_engine)
    assert enc.artifact.format == "onnx" and enc.session.name == "onnxruntime-cpu"
    assert enc.encode("still works").shape == (32,)
    with pytest.raises(BackendUnavailableError, match="no usable TensorRT engine"):
        Encoder(bundle_with_engine, backend="tensorrt")
    with pytest.raises(BackendUnavailableError, match="Pass the bundle directory"):
        Encoder(bundle_with_engine / "engine.fp16.plan")
    with pytest.raises(ValueError, match="cannot run it"):
        Encoder(bundle_with_engine / "engine.fp16.plan", backend="cpu")
    with pytest.raises(BackendUnavailableError, match="onnxruntime-gpu"):
        Encoder(bundle_with_engine, backend="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no engine, nothing to fall back from: no warning
        assert Encoder(tiny_bert_bundle).session.name == "onnxruntime-cpu"


def test_engine_targets(tiny_bert_dir, tmp_path):
    from exporters import export

    bundle = export(tiny_bert_dir, tmp_path / "b", max_length=32, fp16=True, int8_dynamic=True,
                    verify=False)
    assert engine_targets(bundle, None) == ["fp16"]
    assert engine_targets(bundle, ["fp32", "fp16"]) == ["fp32", "fp16"]
    with pytest.raises(ValueError, match="re-export with --fp16 / --int8"):
        engine_targets(bundle, ["int8"])


@pytest.mark.skipif(tensorrt_available() is None, reason="this machine has TensorRT + GPU")
def test_cli_says_how_to_build_engines_later(capsys, tiny_bert_dir, tmp_path):
    out = tmp_path / "b"
    code = main(["--model", str(tiny_bert_dir), "-o", str(out), "-q", "--max-length", "32",
                 "--fp16", "--no-verify", "--opt-batch", "8", "--buckets", "16,32"])
    text = capsys.readouterr().out
    assert code == 0 and (out / "model.fp16.onnx").is_file()
    # the engine flags given travel with the command (they were dropped from it)
    assert (f"angle-export build-engine {out} --precision fp16 --opt-batch 8 --buckets 16,32"
            in text)
    assert "TensorRT engines not built here" in text
    code = main(["build-engine", str(out)])
    assert code == 2 and "cannot build TensorRT engines here" in capsys.readouterr().err
    manifest = json.loads((out / "angle_rt.json").read_text())
    assert all(a["format"] == "onnx" for a in manifest["artifacts"])
