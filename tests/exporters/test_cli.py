"""angle-export as users run it: exit codes, messages, what is (not) left on disk."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import exporters.pipeline as export_mod
from angle_rt import Encoder
from exporters.cli import main
from exporters.onnx_export import export_onnx


def _run(capsys, *argv):
    code = main(list(map(str, argv)))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_export_prints_bundle_and_parity(capsys, tiny_bert_dir, tmp_path):
    code, out, _ = _run(capsys, "--model", tiny_bert_dir, "-o", tmp_path / "b",
                        "--max-length", 48, "-q")
    assert code == 0
    assert f"bundle: {tmp_path / 'b'}" in out and "min cos 1.00000" in out
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "angle_rt.json", "model.onnx", "tokenizer.json"]
    assert Encoder(tmp_path / "b").max_length == 48


def test_existing_bundle_needs_force(capsys, tiny_bert_dir, tmp_path):
    out_dir = tmp_path / "b"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("user data")
    code, _, err = _run(capsys, "--model", tiny_bert_dir, "-o", out_dir, "-q", "--no-verify")
    assert code == 2 and "--force" in err
    assert (out_dir / "keep.txt").read_text() == "user data"
    # --force replaced any directory: a folder of the user's files, or the model's own
    # (`-o MODEL --force` deleted the weights being exported); it replaces a bundle only
    model = shutil.copytree(tiny_bert_dir, tmp_path / "model")
    for target in (out_dir, model):
        before = sorted(p.name for p in target.iterdir())
        code, _, err = _run(capsys, "--model", model, "-o", target, "-q",
                            "--no-verify", "--force")
        assert code == 2 and "not a bundle" in err
        assert sorted(p.name for p in target.iterdir()) == before
    (out_dir / "keep.txt").unlink()
    assert _run(capsys, "--model", tiny_bert_dir, "-o", out_dir, "-q", "--no-verify")[0] == 0
    code, _, _ = _run(capsys, "--model", tiny_bert_dir, "-o", out_dir, "-q", "--no-verify",
                      "--force", "--max-length", "32")
    assert code == 0 and Encoder(out_dir).max_length == 32  # the bundle was replaced
    assert json.loads((out_dir / "angle_rt.json").read_text())["parity"] == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "model"]  # no staging left


def test_ctrl_c_is_one_line_and_leaves_nothing(capsys, tiny_bert_dir, tmp_path, monkeypatch):
    """Ctrl-C mid-export printed a KeyboardInterrupt traceback (exit 130, staging removed)."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_mod, "export_onnx", interrupted)
    code, _, err = _run(capsys, "--model", tiny_bert_dir, "-o", tmp_path / "b", "-q")
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "angle-export: interrupted; nothing written"
    assert list(tmp_path.iterdir()) == []

def test_divergent_graph_fails_the_gate_and_writes_nothing(capsys, tiny_bert_dir, tmp_path,
                                                           monkeypatch):
    def wrong_pooling(model, path, **kw):  # trace CLS while the bundle claims mean
        model.settings.pooling = "cls"
        try:
            return export_onnx(model, path, **kw)
        finally:
            model.settings.pooling = "mean"

    monkeypatch.setattr(export_mod, "export_onnx", wrong_pooling)
    code, _, err = _run(capsys, "--model", tiny_bert_dir, "-o", tmp_path / "b", "-q",
                        "--pooling", "mean")
    assert code == 1
    assert "parity gate failed" in err and "min cosine" in err and "Worst sentences" in err
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_exit_2(capsys, tiny_bert_dir, tmp_path, monkeypatch):
    code, _, err = _run(capsys, "--model", tiny_bert_dir, "-o", tmp_path / "b", "--pooling",
                        "median", "-q")
    assert code == 2 and "unknown pooling strategy 'median'" in err
    code, _, err = _run(capsys, "--model", tiny_bert_dir, "-o", tmp_path / "b", "--opset",
                        "13", "-q")
    assert code == 2 and "opset must be 17…" in err
    code, _, err = _run(capsys, "--model", tiny_bert_dir, "-o", tmp_path / "b", "--opset",
                        "99", "-q")  # was torch's error with the whole traced graph in it
    assert code == 2 and len(err.splitlines()) == 1 and "got 99" in err
    # settings under which the bundle refused every text: exported, exit 0, before
    for flags, why in ((("--pooling", "200"), "past max_length 128"),
                       (("--prompt", "{text} and {text}"), "more than one {text}"),
                       (("--prompt", "C", "--max-length", "4"), "leaves no room")):
        code, _, err = _run(capsys, "--model", tiny_bert_dir, "-o", tmp_path / "b", "-q",
                            "--no-verify", *flags)
        assert code == 2 and why in err and not (tmp_path / "b").exists()
    for dims in ("0,16", "-5", "64"):  # the tiny model is 32 wide
        code, _, err = _run(capsys, "--model", tiny_bert_dir, "-o", tmp_path / "b", "-q",
                            "--no-verify", "--dims", dims)
        assert code == 2 and "dims must be widths 1…32" in err
    code, _, err = _run(capsys, "--model", tmp_path / "missing-model", "-o", tmp_path / "b")
    assert code == 2 and "missing-model does not exist" in err  # was the hub's repo-id rule
    code, _, err = _run(capsys, "--model", tiny_bert_dir, "-o", tmp_path / "b", "-q",
                        "--revision", "v1")  # a local directory has none: it was ignored
    assert code == 2 and "revision 'v1' applies to a hub id" in err
    assert not (tmp_path / "b").exists()
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)  # it failed with "PosixPath('.') has an empty name"
    for out in (".", "..", "x/../.."):
        code, _, err = _run(capsys, "--model", tiny_bert_dir, "-o", out, "-q", "--no-verify")
        assert code == 2 and "is the current directory or holds it" in err, (out, err)
    assert list(here.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["here"]


def test_flags_this_export_would_ignore_or_fail_on_late_exit_2_first(capsys, tiny_bert_dir,
                                                                     tmp_path, monkeypatch):
    """Each of these exported, exit 0, with the flag doing nothing (or failed only after
    every artifact was built); now exit 2 before the model loads, nothing written."""
    loads = []
    monkeypatch.setattr(export_mod.AngleModel, "from_pretrained",
                        lambda *a, **k: loads.append(a) or pytest.fail("model loaded"))
    out = tmp_path / "b"
    cases = [
        (("--calib-size", "64"), "--calib-size applies to --int8 or --int8-dynamic"),
        (("--calib", tmp_path / "c.txt", "--fp16"), "--calib applies to --int8 or"),
        (("--int8-dynamic", "--int8-method", "max"), "--int8-method applies to --int8,"),
        (("--int8-exclude", "query"), "--int8-exclude applies to --int8 or"),
        (("--int8", "--fp16-exclude", "Softmax"), "--fp16-exclude applies to --fp16 or"),
        (("--int8", "--calib-size", "0"), "--calib-size must be ≥ 1, got 0"),
        (("--fp16", "--fp16-exclude", "Softmax,BogusOp"), "names no ONNX operator: BogusOp"),
        (("--buckets", "32,64"), "--buckets applies to TensorRT engines"),
        (("--fp16", "--engine", "no", "--opt-level", "5"), "--opt-level applies to TensorRT"),
        (("--fp16", "--buckets", "32,x"), "--buckets takes comma-separated integers"),
        (("--fp16", "--workspace-gb", "0"), "workspace_gb must be > 0"),
    ]
    for flags, why in cases:
        code, _, err = _run(capsys, "--model", tiny_bert_dir, "-o", out, "-q", *flags)
        assert code == 2 and why in err and len(err.splitlines()) == 1, (flags, err)
    code, _, err = _run(capsys, "--model", tiny_bert_dir, "-o", "", "-q")
    assert code == 2 and "-o/--output is empty" in err  # wrote build/NAME
    assert not out.exists() and not loads


def test_model_path_with_tilde_after_equals_is_expanded(capsys, tiny_bert_dir, tmp_path,
                                                        monkeypatch):
    """`--model=~/m` reaches the exporter unexpanded (the shell expands ~ only at a word's
    start): it was taken as a hub id, or said to exist and then failed to load."""
    monkeypatch.setenv("HOME", str(tiny_bert_dir.parent))
    code, _, err = _run(capsys, f"--model=~/{tiny_bert_dir.name}", "-o", tmp_path / "b",
                          "-q", "--no-verify")
    assert code == 0 and (tmp_path / "b" / "model.onnx").is_file(), err


def test_verify_data_file_is_used_and_topped_up(capsys, tiny_bert_dir, tmp_path, stsb_test):
    data = tmp_path / "mine.jsonl"
    rows = [{"sentence1": a, "sentence2": b} for a, b in
            zip(stsb_test.text1[:100], stsb_test.text2[:100], strict=True)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    code, _, _ = _run(capsys, "--model", tiny_bert_dir, "-o", tmp_path / "b", "-q",
                      "--verify-data", data)
    assert code == 0
    parity = json.loads((tmp_path / "b" / "angle_rt.json").read_text())["parity"]
    assert parity["texts"] == str(data) and parity["n_texts"] >= 1000


def test_prompt_becomes_the_bundle_default(capsys, tiny_bert_dir, tmp_path):
    code, _, _ = _run(capsys, "--model", tiny_bert_dir, "-o", tmp_path / "b", "-q",
                      "--prompt", "C", "--no-verify")
    assert code == 0
    enc = Encoder(tmp_path / "b")
    assert enc.manifest.default_prompt.startswith("Represent this sentence")
    assert np.allclose(enc.encode("x"), enc.encode("x", prompt="C"))
    assert not np.allclose(enc.encode("x"), enc.encode("x", prompt=""), atol=1e-4)


def test_lora_adapter_is_merged_before_export(capsys, tiny_bert_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from angle_torch.model import AngleModel

    base = AutoModel.from_pretrained(tiny_bert_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8,
                                                 target_modules=["query", "value"]))
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapter change something
            torch.nn.init.normal_(p, std=0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    code, _, _ = _run(capsys, "--model", tiny_bert_dir, "--lora", tmp_path / "adapter",
                      "-o", tmp_path / "b", "-q", "--pooling", "mean")
    assert code == 0
    texts = ["the adapter changes this", "and this too"]
    merged = AngleModel.from_pretrained(tiny_bert_dir, lora=tmp_path / "adapter",
                                        pooling="mean").encode(texts)
    plain = AngleModel.from_pretrained(tiny_bert_dir, pooling="mean").encode(texts)
    got = Encoder(tmp_path / "b").encode(texts)
    assert np.allclose(got, merged, atol=1e-5)
    assert not np.allclose(got, plain, atol=1e-3)


def test_graph_with_external_weights_is_consolidated_and_checksummed(tiny_bert_bundle,
                                                                      tmp_path):
    """Models over 2 GB keep weights outside the protobuf; the bundle holds one .data file
    whose checksum is verified like the graph's (exercised here on a small model)."""
    import shutil

    import onnx

    from angle_rt import ChecksumError
    from exporters.bundle import consolidate_external_data, external_data_files, onnx_artifact

    bundle = shutil.copytree(tiny_bert_bundle, tmp_path / "b")
    model = onnx.load(str(bundle / "model.onnx"))
    onnx.save_model(model, str(bundle / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=0)
    assert len(external_data_files(bundle / "model.onnx")) > 10  # one file per tensor
    consolidate_external_data(bundle / "model.onnx")
    assert external_data_files(bundle / "model.onnx") == ["model.onnx.data"]
    assert sorted(p.name for p in bundle.iterdir()) == [
        "angle_rt.json", "model.onnx", "model.onnx.data", "tokenizer.json"]
    art = onnx_artifact(bundle, "model.onnx", "fp32")
    assert [e["file"] for e in art.external_data] == ["model.onnx.data"]
    manifest = json.loads((bundle / "angle_rt.json").read_text())
    manifest["artifacts"][0].update(sha256=art.sha256, external_data=list(art.external_data))
    (bundle / "angle_rt.json").write_text(json.dumps(manifest))
    ref = Encoder(tiny_bert_bundle).encode(["weights outside the graph"])
    assert np.allclose(Encoder(bundle).encode(["weights outside the graph"]), ref, atol=1e-6)
    data = bundle / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-16])
    with pytest.raises(ChecksumError, match=r"model\.onnx\.data does not match"):
        Encoder(bundle)


def test_bundle_gets_the_permissions_of_a_new_directory(capsys, tiny_bert_dir, tmp_path):
    """mkdtemp's 0700 made bundles unreadable to a server running as another user."""
    import os

    umask = os.umask(0o022)
    try:
        code, _, _ = _run(capsys, "--model", tiny_bert_dir, "-o", tmp_path / "b", "-q",
                          "--no-verify", "--max-length", 32)
    finally:
        os.umask(umask)
    assert code == 0
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in (tmp_path / "b").iterdir())


def test_runtime_and_import_errors_exit_2_without_a_traceback(capsys, tiny_bert_dir, tmp_path,
                                                              monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(export_mod, "export", broken)
    code, _, err = _run(capsys, "--model", tiny_bert_dir, "-o", tmp_path / "b", "-q")
    assert code == 2 and "RuntimeError: CUDA error: an illegal memory access" in err
    assert "Traceback" not in err

    def missing(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'onnx'", name="onnx")

    monkeypatch.setattr(export_mod, "export", missing)
    code, _, err = _run(capsys, "--model", tiny_bert_dir, "-o", tmp_path / "b", "-q")
    assert code == 2 and "pip install angle-rt[export]" in err and "Traceback" not in err
    code, _, err = _run(capsys, "build-engine", tmp_path / "no-such-bundle")
    assert code == 2 and err.startswith("angle-export: error:") and "Traceback" not in err


def test_build_engine_is_a_listed_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "{export,build-engine}" in out and "Exit codes: 0 ok, 1 a parity gate failed" in out
    with pytest.raises(SystemExit) as exc:
        main(["build-engine", "--help"])
    assert "--precision" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["build-engine"])  # the bundle is required
    assert exc.value.code == 2


def _export_stopped_mid_run(args: list[str], out: Path, sig: int) -> int:
    """Run `angle-export ARGS -o OUT` in a subprocess, send `sig` once its hidden staging
    beside OUT holds a graph, and return its exit code."""
    import os
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "exporters.cli", *args, "-o", str(out)],
                            cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while (not list(out.parent.glob(f".{out.name}.*/*.onnx"))
               and time.monotonic() < deadline):
            assert proc.poll() is None, "the export ended before it could be stopped"
            time.sleep(0.05)
        proc.send_signal(sig)
        return proc.wait(120)
    finally:
        proc.kill()


def test_sigterm_mid_export_leaves_no_staging_directory(tiny_bert_dir, tmp_path):
    """SIGTERM (a CI timeout, `docker stop`) stops the export like an error: the hidden
    staging directory is removed, the target never appears, the exit is 128 + 15."""
    import signal

    args = ["--model", str(tiny_bert_dir), "--pooling", "mean", "--max-length", "64",
            "--int8-dynamic", "-q"]
    assert _export_stopped_mid_run(args, tmp_path / "b", signal.SIGTERM) == 128 + signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_killed_exports_staging_is_removed_by_the_next_export(tiny_bert_dir, tmp_path):
    """SIGKILL (the OOM killer, kill -9) runs no cleanup: the hidden staging directory, a
    model's worth of ONNX files, stayed beside the target forever. The next export to the
    same target removes it; a live export's staging (its lock held) is left alone."""
    import fcntl
    import os
    import signal
    import subprocess
    import sys

    from exporters.bundle import STAGING_LOCK

    args = ["--model", str(tiny_bert_dir), "--pooling", "mean", "--max-length", "64", "-q"]
    killed = _export_stopped_mid_run([*args, "--int8-dynamic"], tmp_path / "b", signal.SIGKILL)
    assert killed == -signal.SIGKILL
    killed = list(tmp_path.glob(".b.*"))
    assert len(killed) == 1 and (killed[0] / STAGING_LOCK).is_file()
    live = tmp_path / ".b.0123456789ab"  # another export, still running: its lock is held
    live.mkdir()
    fd = os.open(live / STAGING_LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    root = Path(__file__).resolve().parents[2]
    try:
        subprocess.run([sys.executable, "-m", "exporters.cli", *args, "-o", str(tmp_path / "b")],
                       cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.0123456789ab", "b"]
    assert STAGING_LOCK not in {p.name for p in (tmp_path / "b").iterdir()}
