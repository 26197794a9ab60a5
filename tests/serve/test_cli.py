"""`angle-rt` without the [serve] extra, import isolation, argument errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from angle_rt.serve.config import ModelSpec, parse_models, parse_size
from tests.serve.conftest import REPO

BLOCK = r"""
import sys
BLOCKED = tuple(sys.argv[1].split(","))
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
sys.argv = sys.argv[1:]
"""
WEB = ("starlette", "uvicorn", "orjson", "prometheus_client", "fastapi", "httpx")


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO)


def test_serve_without_the_extra_exits_2_naming_it(tiny_bert_bundle):
    code = BLOCK + "from angle_rt.cli import main; sys.exit(main(sys.argv[1:]))"
    out = _run(code, ",".join(WEB), "serve", str(tiny_bert_bundle))
    assert out.returncode == 2, out.stderr
    assert "pip install 'angle-rt[serve]'" in out.stderr and "starlette" in out.stderr
    helped = _run(code, ",".join(WEB), "serve", "--help")
    assert helped.returncode == 0 and "--max-batch-tokens" in helped.stdout


def test_runtime_and_batcher_import_no_web_stack_or_torch():
    code = BLOCK + (
        "import angle_rt, angle_rt.serve.batcher, angle_rt.serve.config\n"
        "assert 'angle_rt.serve.app' not in sys.modules\n"
        "print('ok')")
    out = _run(code, ",".join((*WEB, "torch", "transformers")))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    out = _run("import sys, angle_rt; assert 'angle_rt.serve' not in sys.modules")
    assert out.returncode == 0, out.stderr


def test_bad_bundle_and_duplicate_names_exit_2(tmp_path, tiny_bert_bundle):
    cli = [sys.executable, "-m", "angle_rt.cli", "serve", "--port", "0"]
    out = subprocess.run([*cli, str(tmp_path / "missing")], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert out.returncode == 2 and "does not exist" in out.stderr
    out = subprocess.run([*cli, f"a={tiny_bert_bundle}", f"a={tiny_bert_bundle}"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 2 and "NAME=BUNDLE" in out.stderr


def test_model_names_and_sizes(tmp_path):
    (tmp_path / "minilm").mkdir()
    (tmp_path / "minilm" / "model.onnx").write_bytes(b"")
    specs = parse_models([str(tmp_path / "minilm"), f"big={tmp_path}/x"], None)
    assert [s.name for s in specs] == ["minilm", "big"]
    assert specs[1] == ModelSpec("big", tmp_path / "x")
    assert parse_models([str(tmp_path / "minilm" / "model.onnx")])[0].name == "minilm"
    with pytest.raises(ValueError, match="two bundles"):
        parse_models([str(tmp_path / "minilm"), str(tmp_path / "minilm" / "model.onnx")])
    assert parse_models([str(tmp_path / "minilm")], "served")[0].name == "served"
    assert (parse_size("2MB"), parse_size("64KiB"), parse_size("10")) == (2_000_000, 65536, 10)


@pytest.mark.parametrize("spin", [False, True])
def test_onnx_runtime_threads_and_spinning(tiny_bert_bundle, spin):
    """Default: one worker a physical core on one thread each, idle threads sleep; --spin:
    one worker on one core fewer, spinning."""
    pytest.importorskip("prometheus_client")
    from angle_rt._system import physical_cores
    from angle_rt.serve.config import ServeConfig, config_from_args
    from angle_rt.serve.metrics import Metrics
    from angle_rt.serve.server import open_models

    key = "session.intra_op.allow_spinning"
    args = ["serve", str(tiny_bert_bundle)] + (["--spin"] if spin else [])
    from angle_rt.cli import build_parser

    config = config_from_args(build_parser().parse_args(args))
    assert isinstance(config, ServeConfig) and config.spin is spin
    models = open_models(config, Metrics())
    try:
        model = next(iter(models.values()))
        opts = model.encoder.session.inference_session.get_session_options()
        assert opts.intra_op_num_threads == (max(1, physical_cores() - 1) if spin else 1)
        assert model.workers == (1 if spin else physical_cores())
        # a turn of about the same time whatever the split: 256 tokens a worker's thread
        assert model.fair_quantum_tokens == 256 * opts.intra_op_num_threads
        # and a lane for small requests beside the workers
        assert model.lane_tokens == model.batcher.lane_tokens == 128
        assert len(model.batcher._threads) == model.workers + 1
        if spin:
            with pytest.raises(RuntimeError, match="does not have configuration"):
                opts.get_session_config_entry(key)
        else:
            assert opts.get_session_config_entry(key) == "0"
    finally:
        for model in models.values():
            model.close()


def test_output_dtype_flags(tiny_bert_bundle, tmp_path):
    """--output-dtype int8/uint8 need --output-ranges, read (and checked) at start."""
    import numpy as np

    from angle_rt.cli import build_parser
    from angle_rt.serve.config import config_from_args

    def config(*extra):
        return config_from_args(build_parser().parse_args(["serve", str(tiny_bert_bundle),
                                                            *extra]))

    assert config("--output-dtype", "binary").output_dtype == "binary"
    with pytest.raises(ValueError, match="needs --output-ranges"):
        config("--output-dtype", "int8")
    (tmp_path / "bad.json").write_text('{"ranges": null}')
    with pytest.raises(ValueError, match="holds no"):
        config("--output-dtype", "int8", "--output-ranges", str(tmp_path / "bad.json"))
    np.save(tmp_path / "r.npy", np.zeros((2, 32), np.float32))
    cfg = config("--output-dtype", "uint8", "--output-ranges", str(tmp_path / "r.npy"))
    assert cfg.output_ranges == tmp_path / "r.npy"


def test_lane_tokens_flag(tiny_bert_bundle, capsys):
    """--lane-tokens 0 turns the small requests' lane off (workers only); negative is an
    argument error."""
    pytest.importorskip("prometheus_client")
    from angle_rt.cli import build_parser
    from angle_rt.serve.config import config_from_args
    from angle_rt.serve.metrics import Metrics
    from angle_rt.serve.server import open_models

    parser = build_parser()
    config = config_from_args(parser.parse_args(["serve", str(tiny_bert_bundle),
                                                 "--lane-tokens", "0"]))
    models = open_models(config, Metrics())
    try:
        model = next(iter(models.values()))
        assert model.lane_tokens == 0 and len(model.batcher._threads) == model.workers
        assert model.info()["lane_tokens"] == 0
    finally:
        for model in models.values():
            model.close()
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", str(tiny_bert_bundle), "--lane-tokens", "-1"])
    assert "must be ≥ 0" in capsys.readouterr().err
