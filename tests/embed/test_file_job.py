"""`angle-rt embed`: every input format, output format and dtype, resume, bad rows."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from angle_rt import Encoder
from angle_rt.embed import InputError, OutputExistsError, embed_file
from angle_rt.embed import job as job_mod
from angle_rt.embed import writers as w
from angle_rt.embed.cli import add_embed_parser, main
from angle_rt.postprocess import cosine_rows
from angle_rt.quantization import PRECISIONS
from tests.embed._util import read_output

ROOT = Path(__file__).resolve().parents[2]
INPUTS = ["corpus.parquet", "parts", "corpus.jsonl", "corpus.csv", "corpus.txt"]


def _ids(sentences: list[str], kind: str) -> list:
    return list(range(len(sentences))) if kind == "corpus.txt" else \
        [f"doc-{i}" for i in range(len(sentences))]


@pytest.mark.parametrize("name", INPUTS)
def test_each_input_format_gives_encode_vectors_and_ids(tiny_bert_bundle, tiny_encoder,
                                                        corpus_dir, sentences, tmp_path, name):
    id_column = None if name == "corpus.txt" else "id"
    out = tmp_path / "out.parquet"
    r = embed_file(tiny_bert_bundle, corpus_dir / name, out, id_column=id_column,
                   chunk_size=1000)
    ids, vecs, meta = read_output(out, id_column or "id")
    assert r.rows == len(sentences) and r.skipped == 0
    assert ids == _ids(sentences, name)
    assert cosine_rows(vecs, tiny_encoder.encode(sentences)).min() >= 0.99999
    assert meta["rows"] == len(sentences) and meta["output_dtype"] == "float32"


def test_output_formats_hold_the_same_rows(tiny_bert_bundle, corpus_dir, tmp_path, sentences):
    """.parquet (one row group per chunk, fixed-size list of float32), .npy and a directory of
    Parquet parts: the same ids and bit-identical vectors."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    got = {}
    for name in ("out.parquet", "out.npy", "out_dir"):
        embed_file(tiny_bert_bundle, corpus_dir / "corpus.parquet", tmp_path / name,
                   chunk_size=1000)
        got[name] = read_output(tmp_path / name)
        assert not (tmp_path / f"{name}.partial").exists()
    f = pq.ParquetFile(tmp_path / "out.parquet")
    assert f.metadata.num_row_groups == 3
    assert f.schema_arrow.field("embedding").type == pa.list_(pa.float32(), 32)
    assert f.schema_arrow.field("id").type == pa.int64()
    assert len(list((tmp_path / "out_dir").glob("part-*.parquet"))) == 3
    ref_ids, ref_vecs, _ = got["out.parquet"]
    assert ref_ids == list(range(len(sentences)))
    for ids, vecs, meta in got.values():
        assert ids == ref_ids
        np.testing.assert_array_equal(vecs, ref_vecs)
        assert meta["fingerprint"]["chunk_size"] == 1000


@pytest.fixture(scope="module")
def float_vectors(tiny_bert_bundle, corpus_dir, tmp_path_factory) -> np.ndarray:
    out = tmp_path_factory.mktemp("f32") / "f32.parquet"
    embed_file(tiny_bert_bundle, corpus_dir / "corpus.parquet", out, chunk_size=1000)
    return read_output(out)[1]


@pytest.mark.parametrize("dtype", [p for p in PRECISIONS if p != "float32"])
def test_output_dtype_equals_reference_quantization(tiny_bert_bundle, corpus_dir, tmp_path,
                                                    float_vectors, dtype):
    """Each --output-dtype is sentence-transformers' quantize_embeddings of the float32
    vectors, int8/uint8 with ranges calibrated on the first chunk (in the metadata)."""
    from sentence_transformers.util import quantize_embeddings as st_quantize

    src, ref = corpus_dir / "corpus.parquet", float_vectors
    embed_file(tiny_bert_bundle, src, tmp_path / "q.parquet", chunk_size=1000,
               output_dtype=dtype)
    _, got, meta = read_output(tmp_path / "q.parquet")
    if dtype == "float16":
        expected = ref.astype(np.float16)
    else:
        expected = st_quantize(ref, dtype, calibration_embeddings=ref[:1000])
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    if dtype in ("int8", "uint8"):
        np.testing.assert_array_equal(np.asarray(meta["ranges"], np.float32),
                                      np.vstack([ref[:1000].min(0), ref[:1000].max(0)]))
    else:
        assert meta["ranges"] is None


def test_prompt_dimensions_normalize(tiny_bert_bundle, tiny_encoder, corpus_dir, tmp_path,
                                     sentences):
    out = tmp_path / "out.npy"
    embed_file(tiny_bert_bundle, corpus_dir / "corpus.txt", out, prompt="query: ",
               dimensions=16, normalize=True, chunk_size=1000)
    _, vecs, meta = read_output(out)
    ref = tiny_encoder.encode(sentences, prompt="query: ", truncate_dim=16,
                              normalize_embeddings=True)
    assert vecs.shape == (len(sentences), 16)
    assert cosine_rows(vecs, ref).min() >= 0.99999
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    assert meta["fingerprint"]["template"] == "query: " and meta["dim"] == 16


# --- resume ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory, sentences) -> Path:
    """2 × STS-B test (5,516 rows): long enough to kill a run mid-way."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path_factory.mktemp("big") / "big.parquet"
    texts = sentences * 2
    pq.write_table(pa.table({"text": texts}), path, row_group_size=2000)
    return path


def _kill_mid_run(cmd: list[str], staging: Path, timeout: float = 90) -> None:
    """Start `cmd`, wait until its first chunk is recorded on disk, SIGKILL it."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            state = staging / w.STATE
            if state.exists() and json.loads(state.read_text())["parts"] >= 1:
                break
            time.sleep(0.002)
        assert proc.poll() is None, f"the run ended before the kill: {proc.stderr.read()}"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def _files(out: Path) -> dict[str, bytes]:
    return {p.name.replace(out.name, "OUT"): p.read_bytes()
            for p in sorted(out.parent.glob(out.name + "*")) if p.is_file()}


@pytest.mark.parametrize("suffix", [".parquet", pytest.param(".npy", marks=pytest.mark.slow)])
def test_resume_after_kill_gives_the_uninterrupted_file(tiny_bert_bundle, big_corpus, tmp_path,
                                                        suffix):
    args = ["--chunk-size", "128", "--no-progress", "-q"]
    ref = tmp_path / "ref" / f"vectors{suffix}"
    ref.parent.mkdir()
    assert main([str(tiny_bert_bundle), str(big_corpus), str(ref), *args]) == 0
    out = tmp_path / "run" / f"vectors{suffix}"
    out.parent.mkdir()
    cmd = [sys.executable, "-m", "angle_rt.embed", str(tiny_bert_bundle), str(big_corpus),
           str(out), *args]
    _kill_mid_run(cmd, out.with_name(out.name + ".partial"))
    assert not out.exists()
    state = json.loads((out.with_name(out.name + ".partial") / w.STATE).read_text())
    assert 0 < state["rows_read"] < 5516
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert _files(out) == _files(ref)
    ids, _, _ = read_output(out)
    assert ids == list(range(5516))


class _Crash(Exception):
    pass


def _crash_on(monkeypatch, target, name: str, call: int) -> None:
    """Make `target.name` raise _Crash on its `call`-th call (a kill at that point)."""
    real, n = getattr(target, name), [0]

    def wrapped(*a, **k):
        n[0] += 1
        if n[0] == call:
            raise _Crash(f"{name} call {call}")
        return real(*a, **k)

    monkeypatch.setattr(target, name, wrapped)


CRASH_POINTS = [
    ("chunk staged, state not saved", w.Writer, "save_state", 3),
    ("state saved, next chunk half done", job_mod, "quantize_embeddings", 3),
    ("skipped list written, state not saved", w.Writer, "append_skipped", 2),
    ("during finalize", w, "move_if_present", 1),
    ("after finalize, before cleanup", w.Writer, "finish_side_files", 1),
]


@pytest.mark.parametrize("suffix", [".parquet", ".npy", ""])
def test_a_crash_at_any_point_resumes_to_the_same_output(tiny_bert_bundle, corpus_dir, tmp_path,
                                                         monkeypatch, suffix):
    src = tmp_path / "in.jsonl"
    lines = (corpus_dir / "corpus.jsonl").read_text().splitlines()[:600]
    lines[130] = '{"id": "bad-1", "text": null}'
    lines[450] = '{"id": "bad-2", "text": 7}'
    src.write_text("\n".join(lines) + "\n")
    kw = {"id_column": "id", "chunk_size": 100, "on_bad_row": "skip", "output_dtype": "int8"}
    ref = tmp_path / "ref" / f"out{suffix}"
    ref.parent.mkdir()
    embed_file(tiny_bert_bundle, src, ref, **kw)
    for i, (what, target, name, call) in enumerate(CRASH_POINTS):
        out = tmp_path / f"run{i}" / f"out{suffix}"
        out.parent.mkdir()
        with monkeypatch.context() as m:
            _crash_on(m, target, name, call)
            with pytest.raises(_Crash):
                embed_file(tiny_bert_bundle, src, out, **kw)
        r = embed_file(tiny_bert_bundle, src, out, **kw)
        assert r.rows == 598 and r.skipped == 2, what
        got, want = _files(out), _files(ref)
        if suffix == "":  # a directory: compare the files inside
            got = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
            want = {p.name: p.read_bytes() for p in sorted(ref.iterdir())}
            assert _files(out.with_name("out.skipped.jsonl")) == \
                _files(ref.with_name("out.skipped.jsonl"))
        assert got == want, what
        assert not out.with_name(out.name + ".partial").exists(), what


def _crash_half_removing_staging(monkeypatch) -> None:
    """A kill inside the removal of OUTPUT.partial after OUTPUT was published: some of
    its part files gone, its state left."""
    real = w.remove

    def remove(path):
        if path.name.endswith(".partial") and path.is_dir():
            for part in sorted(path.glob("part-*"))[:2]:
                part.unlink()
            raise _Crash("staging half removed")
        real(path)

    monkeypatch.setattr(w, "remove", remove)


def _crash_before_first_state(monkeypatch) -> None:
    """A kill after the first state.json.tmp was written, before it was renamed."""
    def atomic_write(path, data):
        path.with_name(path.name + ".tmp").write_bytes(data[:10])
        raise _Crash("first state not in place")

    monkeypatch.setattr(w, "atomic_write", atomic_write)


@pytest.mark.parametrize(("suffix", "crash"), [
    (".parquet", _crash_half_removing_staging), (".npy", _crash_half_removing_staging),
    (".parquet", _crash_before_first_state), (".npy", _crash_before_first_state),
    ("", _crash_before_first_state)])  # a directory's staging becomes OUTPUT in one rename
def test_a_crash_while_starting_or_cleaning_up_reruns_cleanly(tiny_bert_bundle, corpus_dir,
                                                              tmp_path, monkeypatch, suffix,
                                                              crash):
    """Both once left a staging every rerun refused, --overwrite included for the first
    ("missing part files its state lists"; "interrupted run with other arguments (differs
    in: unknown)"), until removed by hand."""
    src = corpus_dir / "corpus.jsonl"
    kw = {"id_column": "id", "chunk_size": 500, "on_bad_row": "skip"}
    ref = tmp_path / "ref" / f"out{suffix}"
    ref.parent.mkdir()
    embed_file(tiny_bert_bundle, src, ref, **kw)
    out = tmp_path / "run" / f"out{suffix}"
    out.parent.mkdir()
    with monkeypatch.context() as m:
        crash(m)
        with pytest.raises(_Crash):
            embed_file(tiny_bert_bundle, src, out, **kw)
    r = embed_file(tiny_bert_bundle, src, out, **kw)
    assert r.rows == 2758
    got, want = read_output(out), read_output(ref)
    assert got[0] == want[0]
    np.testing.assert_array_equal(got[1], want[1])
    assert sorted(p.name for p in out.parent.iterdir()) == \
        sorted(p.name for p in ref.parent.iterdir())  # no staging left; the side files


def test_a_directory_killed_after_its_final_rename_is_already_readable(
        tiny_bert_bundle, corpus_dir, tmp_path, monkeypatch):
    """The staging becomes OUTPUT/ by one rename; a kill right after it once left the job's
    state file in the dataset, which pyarrow and DuckDB took for a data file and failed on
    until the job was rerun."""
    ds = pytest.importorskip("pyarrow.dataset")
    out = tmp_path / "out"
    real = w.fsync_dir

    def fsync_dir(path):
        real(path)
        if Path(path) == out.parent and out.is_dir():
            raise _Crash("killed after the final rename")

    with monkeypatch.context() as m:
        m.setattr(w, "fsync_dir", fsync_dir)
        with pytest.raises(_Crash):
            embed_file(tiny_bert_bundle, corpus_dir / "corpus.jsonl", out, id_column="id")
    assert ds.dataset(out, format="parquet").count_rows() == 2758
    r = embed_file(tiny_bert_bundle, corpus_dir / "corpus.jsonl", out, id_column="id")
    assert r.complete_before and r.rows == 2758
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("part-")) == \
        [w.DIR_META]


def test_rerun_of_a_complete_job_does_nothing(tiny_bert_bundle, corpus_dir, tmp_path):
    out = tmp_path / "out.parquet"
    embed_file(tiny_bert_bundle, corpus_dir / "corpus.csv", out, id_column="id")
    before = out.read_bytes()
    r = embed_file(tiny_bert_bundle, corpus_dir / "corpus.csv", out, id_column="id")
    assert r.complete_before and r.rows == 2758 and out.read_bytes() == before


# --- refusals and bad input -----------------------------------------------------------

def test_output_from_other_arguments_is_refused_unless_overwrite(tiny_bert_bundle, corpus_dir,
                                                                 tmp_path, capsys):
    out = tmp_path / "out.parquet"
    src = str(corpus_dir / "corpus.parquet")
    assert main([str(tiny_bert_bundle), src, str(out), "-q"]) == 0
    assert main([str(tiny_bert_bundle), src, str(out), "--output-dtype", "int8", "-q"]) == 2
    err = capsys.readouterr().err
    assert "other arguments" in err and "output_dtype" in err and "--overwrite" in err
    assert main([str(tiny_bert_bundle), src, str(out), "--output-dtype", "int8", "-q",
                 "--overwrite"]) == 0
    assert read_output(out)[2]["output_dtype"] == "int8"
    foreign = tmp_path / "foreign.npy"
    np.save(foreign, np.zeros(3))
    with pytest.raises(OutputExistsError, match="not written by `angle-rt embed`"):
        embed_file(tiny_bert_bundle, src, foreign)
    assert embed_file(tiny_bert_bundle, src, foreign, overwrite=True).rows == 2758
    folder = tmp_path / "my_documents"  # a mistyped OUTPUT: never deleted
    folder.mkdir()
    (folder / "thesis.txt").write_text("years of work")
    with pytest.raises(OutputExistsError, match="not replacing it even with --overwrite"):
        embed_file(tiny_bert_bundle, src, folder, overwrite=True)
    assert (folder / "thesis.txt").read_text() == "years of work"


def test_interrupted_run_with_other_arguments_is_refused(tiny_bert_bundle, corpus_dir, tmp_path,
                                                         monkeypatch):
    out = tmp_path / "out.parquet"
    src = corpus_dir / "corpus.parquet"
    with monkeypatch.context() as m:
        _crash_on(m, w.Writer, "save_state", 3)
        with pytest.raises(_Crash):
            embed_file(tiny_bert_bundle, src, out, chunk_size=500)
    with pytest.raises(OutputExistsError, match=r"interrupted run .*chunk_size"):
        embed_file(tiny_bert_bundle, src, out, chunk_size=1000)
    r = embed_file(tiny_bert_bundle, src, out, chunk_size=1000, overwrite=True)
    assert r.rows == 2758 and r.resumed_from == 0
    assert pytest.importorskip("pyarrow.parquet").ParquetFile(out).metadata.num_row_groups == 3


BAD_ROWS = {5: '{"id": "d5", "text": null}', 9: '{"id": "d9", "text": 42}',
            12: '{"id": "d12"}', 20: '{"id": "d20", "text": "\\ud800 lone"}',
            30: '{"id": null, "text": "no id"}'}


@pytest.fixture()
def bad_jsonl(tmp_path) -> Path:
    lines = [json.dumps({"id": f"d{i}", "text": f"sentence number {i}"}) for i in range(40)]
    for row, line in BAD_ROWS.items():
        lines[row] = line
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _crash_after_move(monkeypatch, k: int) -> None:
    """A kill right after the k-th file moved into place by publishing."""
    real, n = w.move_if_present, [0]

    def moved(src, dst):
        real(src, dst)
        n[0] += 1
        if n[0] == k:
            raise _Crash(f"after move {k}")

    monkeypatch.setattr(w, "move_if_present", moved)


@pytest.mark.parametrize(("suffix", "rows_per_file", "moves"), [
    (".npy", None, 3), ("", None, 1), ("", 70, 1), (".parquet", None, 1)])
def test_an_overwrite_killed_while_publishing_resumes_to_its_output(
        tiny_bert_bundle, corpus_dir, tmp_path, monkeypatch, suffix, rows_per_file, moves):
    """The rerun of an --overwrite run killed while moving its output into place removed
    the 'old' output again, i.e. what the killed run had already moved: a .npy of an N-row
    header over no rows or without its ids, a directory without its skipped list, exit 0."""
    src = tmp_path / "in.jsonl"
    lines = (corpus_dir / "corpus.jsonl").read_text().splitlines()[:300]
    lines[50] = '{"id": "bad-1", "text": null}'
    src.write_text("\n".join(lines) + "\n")
    kw = {"id_column": "id", "chunk_size": 100, "on_bad_row": "skip",
          "rows_per_file": rows_per_file}
    ref = tmp_path / "ref" / f"out{suffix}"
    ref.parent.mkdir()
    embed_file(tiny_bert_bundle, src, ref, normalize=True, **kw)
    for k in range(1, moves + 1):
        out = tmp_path / f"run{k}" / f"out{suffix}"
        out.parent.mkdir()
        embed_file(tiny_bert_bundle, src, out, **kw)  # the output to replace
        with monkeypatch.context() as m:
            _crash_after_move(m, k)
            with pytest.raises(_Crash):
                embed_file(tiny_bert_bundle, src, out, normalize=True, overwrite=True, **kw)
        r = embed_file(tiny_bert_bundle, src, out, normalize=True, overwrite=True, **kw)
        assert (r.rows, r.skipped) == (299, 1), k
        got, want = read_output(out), read_output(ref)
        assert got[0] == want[0] and got[2] == want[2], k
        np.testing.assert_array_equal(got[1], want[1])
        assert _files(out.with_name(out.name + ".skipped.jsonl")) == \
            _files(ref.with_name(ref.name + ".skipped.jsonl")), k
        assert not out.with_name(out.name + ".partial").exists(), k


def test_a_complete_jobs_rerun_leaves_another_runs_staging_alone(tiny_bert_bundle, bad_jsonl,
                                                                 tmp_path, monkeypatch):
    """Rerunning a complete job moved the staged skipped list of another, interrupted run
    (other arguments) over its own and deleted that run's staging."""
    out = tmp_path / "o.parquet"
    kw = {"id_column": "id", "on_bad_row": "skip", "chunk_size": 16}
    embed_file(tiny_bert_bundle, bad_jsonl, out, **kw)
    skipped = out.with_name("o.parquet.skipped.jsonl").read_bytes()
    with monkeypatch.context() as m:
        _crash_on(m, w.Writer, "save_state", 3)
        with pytest.raises(_Crash):
            embed_file(tiny_bert_bundle, bad_jsonl, out, normalize=True, overwrite=True, **kw)
    assert embed_file(tiny_bert_bundle, bad_jsonl, out, **kw).complete_before
    assert out.with_name("o.parquet.skipped.jsonl").read_bytes() == skipped
    r = embed_file(tiny_bert_bundle, bad_jsonl, out, normalize=True, overwrite=True, **kw)
    assert r.resumed_from > 0  # the interrupted run's staging was still there to resume


def test_a_bad_row_error_leaves_no_staging_so_its_advice_works(tiny_bert_bundle, bad_jsonl,
                                                               tmp_path):
    """After 'fix the input or pass --on-bad-row skip', passing --on-bad-row skip was
    refused (exit 2): the failed run's staging held other arguments."""
    out = tmp_path / "o.parquet"
    with pytest.raises(InputError, match="--on-bad-row skip"):
        embed_file(tiny_bert_bundle, bad_jsonl, out, id_column="id", chunk_size=4)
    assert not out.with_name("o.parquet.partial").exists() and not out.exists()
    r = embed_file(tiny_bert_bundle, bad_jsonl, out, id_column="id", chunk_size=4,
                   on_bad_row="skip")
    assert r.skipped > 0 and r.resumed_from == 0


def test_bad_row_error_names_row_and_id(tiny_bert_bundle, bad_jsonl, tmp_path, capsys):
    code = main([str(tiny_bert_bundle), str(bad_jsonl), str(tmp_path / "o.parquet"),
                 "--id-column", "id", "-q"])
    err = capsys.readouterr().err
    assert code == 1
    assert "row 5 (id 'd5'): null text" in err and "--on-bad-row skip" in err


def test_bad_rows_skipped_are_listed(tiny_bert_bundle, tiny_encoder, bad_jsonl, tmp_path):
    out = tmp_path / "o.parquet"
    r = embed_file(tiny_bert_bundle, bad_jsonl, out, id_column="id", on_bad_row="skip",
                   chunk_size=16)
    assert (r.rows, r.skipped) == (35, 5)
    listed = [json.loads(x) for x in
              (tmp_path / "o.parquet.skipped.jsonl").read_text().splitlines()]
    assert [(s["row"], s["id"]) for s in listed] == [(5, "d5"), (9, "d9"), (12, "d12"),
                                                    (20, "d20"), (30, None)]
    assert [s["reason"] for s in listed] == [
        "null text", "text is int, not str", "null text",
        "text is not valid Unicode (lone surrogate)", "null id"]
    ids, vecs, meta = read_output(out)
    good = [i for i in range(40) if i not in BAD_ROWS]
    assert ids == [f"d{i}" for i in good] and meta["skipped"] == 5
    ref = tiny_encoder.encode([f"sentence number {i}" for i in good])
    assert cosine_rows(vecs, ref).min() >= 0.99999


def test_directory_output_with_skipped_rows_is_a_clean_dataset(tiny_bert_bundle, bad_jsonl,
                                                               tmp_path):
    """The skipped-rows list lies beside the dataset, never inside it: pyarrow reads the
    directory as Parquet (it failed on skipped.jsonl: "magic bytes")."""
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    out = tmp_path / "vectors"
    r = embed_file(tiny_bert_bundle, bad_jsonl, out, id_column="id", on_bad_row="skip",
                   chunk_size=16)
    assert (r.rows, r.skipped) == (35, 5)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("_")) == \
        [f"part-{i:06d}.parquet" for i in range(3)]
    assert len((tmp_path / "vectors.skipped.jsonl").read_text().splitlines()) == 5
    assert pq.read_table(out).num_rows == 35
    assert ds.dataset(out, format="parquet").to_table().num_rows == 35


@pytest.mark.parametrize("suffix", [".npy", ".parquet", ""])
@pytest.mark.parametrize("failure", ["kill", "ENOSPC"])
def test_a_failure_inside_the_first_chunk_resumes_to_the_same_output(
        tiny_bert_bundle, corpus_dir, tmp_path, monkeypatch, suffix, failure):
    """Killed (or out of disk) while the first chunk is being written, or after it was
    written but before its state: the rerun cuts what was staged and writes every row once
    (.npy appended chunk 0 again: more id lines than rows, vectors shifted against ids)."""
    import errno

    src = tmp_path / "in.jsonl"
    src.write_text("\n".join((corpus_dir / "corpus.jsonl").read_text().splitlines()[:300])
                   + "\n")
    kw = {"id_column": "id", "chunk_size": 100}
    ref = tmp_path / "ref" / f"out{suffix}"
    ref.parent.mkdir()
    embed_file(tiny_bert_bundle, src, ref, **kw)
    exc = _Crash("killed") if failure == "kill" else OSError(errno.ENOSPC, "No space left")
    for point in ("first write, before its data is synced", "first write, data synced",
                  "first chunk written, state not saved"):
        out = tmp_path / point.replace(" ", "_").replace(",", "") / f"out{suffix}"
        out.parent.mkdir()
        with monkeypatch.context() as m:
            if point.startswith("first write"):
                _fail_inside_first_write(m, exc, 1 if "before" in point else 2)
            else:
                _fail_on(m, w.Writer, "save_state", 2, exc)
            with pytest.raises(type(exc)):
                embed_file(tiny_bert_bundle, src, out, **kw)
        r = embed_file(tiny_bert_bundle, src, out, **kw)
        assert r.rows == 300, point
        if suffix == "":
            got = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
            want = {p.name: p.read_bytes() for p in sorted(ref.iterdir())}
        else:
            got, want = _files(out), _files(ref)
        assert got == want, point
        ids, vecs, _ = read_output(out)
        assert ids == [f"doc-{i}" for i in range(300)] and len(vecs) == 300, point


def _fail_on(monkeypatch, target, name: str, call: int, exc: BaseException) -> None:
    real, n = getattr(target, name), [0]

    def wrapped(*a, **k):
        n[0] += 1
        if n[0] == call:
            raise exc
        return real(*a, **k)

    monkeypatch.setattr(target, name, wrapped)


def _fail_inside_first_write(monkeypatch, exc: BaseException, fsync_call: int) -> None:
    """Raise `exc` at the `fsync_call`-th os.fsync inside the writers' first `write` (its
    data is then on disk, not yet recorded)."""
    seen = {"writes": 0, "fsyncs": 0}
    real_fsync = os.fsync

    def fsync(fd):
        if seen["writes"] == 1:
            seen["fsyncs"] += 1
            if seen["fsyncs"] == fsync_call:
                raise exc
        return real_fsync(fd)

    for cls in (w.NpyWriter, w._ParquetParts):
        def write(self, *a, _real=cls.write, **k):
            seen["writes"] += 1
            try:
                return _real(self, *a, **k)
            finally:
                seen["writes"] += 100  # past the first write: stop counting
        monkeypatch.setattr(cls, "write", write)
    monkeypatch.setattr(os, "fsync", fsync)


def test_a_second_run_on_the_same_output_refuses_and_a_dead_runs_lock_is_taken_over(
        tiny_bert_bundle, corpus_dir, tmp_path, capsys):
    """Two runs on one OUTPUT duplicated rows. Now the second exits 2 naming the holder;
    once the holder is killed (kill -9, its lock file left behind) a run takes over."""
    out = tmp_path / "vectors.parquet"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from angle_rt.embed.lock import output_lock\n"
         f"with output_lock(Path({str(out)!r})):\n"
         "    print('locked', flush=True); time.sleep(120)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = [str(tiny_bert_bundle), str(corpus_dir / "corpus.txt"), str(out), "-q"]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"being written by another run (pid {holder.pid} on" in err
        assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    finally:
        holder.kill()
        holder.wait()
    assert out.with_name(out.name + ".lock").exists()  # left by the killed holder
    assert main(args) == 0
    assert read_output(out)[1].shape[0] == 2758
    assert not out.with_name(out.name + ".lock").exists()


@pytest.mark.parametrize(("name", "flags", "message"), [
    ("corpus.parquet", ["--text-column", "body"], r"no column 'body' \(--text-column\); its "
     r"columns: 'id', 'text', 'score'"),
    ("corpus.jsonl", ["--id-column", "key"], r"no column 'key' \(--id-column\); its columns: "
     r"'id', 'text'"),
    ("corpus.csv", ["--text-column", "body"], r"its columns: 'id', 'text'"),
    ("corpus.txt", ["--id-column", "id"], "no columns, so --id-column does not apply"),
    ("corpus.parquet", ["--text-column", "score"], "'score' is int64, not a string column"),
])
def test_missing_or_wrong_column_names_the_columns(tiny_bert_bundle, corpus_dir, tmp_path,
                                                   capsys, name, flags, message):
    code = main([str(tiny_bert_bundle), str(corpus_dir / name), str(tmp_path / "o.npy"),
                 *flags, "-q"])
    assert code == 1
    assert pytest.importorskip("re").search(message, capsys.readouterr().err)
    with pytest.raises(InputError):
        embed_file(tiny_bert_bundle, corpus_dir / name, tmp_path / "o.npy",
                   **{f.lstrip("-").replace("-", "_"): v for f, v in [flags]})


def test_bad_arguments_exit_2(tiny_bert_bundle, corpus_dir, tmp_path, capsys):
    src = str(corpus_dir / "corpus.txt")
    assert main([str(tiny_bert_bundle), src, str(tmp_path / "o.csv")]) == 2
    assert "unknown output format" in capsys.readouterr().err
    assert main([str(tiny_bert_bundle), src, str(tmp_path / "o.npy"), "--dimensions", "999"]) \
        == 2
    assert "truncate_dim" in capsys.readouterr().err
    assert main([str(tmp_path / "nope"), src, str(tmp_path / "o.npy")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not list(tmp_path.glob("o.*"))


def test_subcommand_wiring(tiny_bert_bundle, corpus_dir, tmp_path):
    """What `angle-rt` does: add_embed_parser on its subparsers, then args.func(args)."""
    parser = argparse.ArgumentParser(prog="angle-rt")
    add_embed_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["embed", str(tiny_bert_bundle), str(corpus_dir / "corpus.txt"),
                              str(tmp_path / "o.npy"), "--output-dtype", "ubinary", "-q"])
    assert args.func(args) == 0
    _, vecs, _ = read_output(tmp_path / "o.npy")
    assert vecs.shape == (2758, 4) and vecs.dtype == np.uint8


def test_layers_picks_the_depth_variant(tiny_depth_bundle, corpus_dir, tmp_path, sentences):
    """`--layers K` embeds with an ESE bundle's depth-K artifact; the fingerprint differs."""
    src = corpus_dir / "corpus.jsonl"
    out = tmp_path / "cut.npy"
    assert main([str(tiny_depth_bundle), str(src), str(out), "--layers", "1", "-q",
                 "--no-progress"]) == 0
    texts = [json.loads(line)["text"] for line in src.read_text().splitlines()]
    with Encoder(tiny_depth_bundle, layers=1) as cut:
        np.testing.assert_allclose(np.load(out), cut.encode(texts), atol=1e-5)
    with pytest.raises(OutputExistsError, match="artifact"):
        embed_file(tiny_depth_bundle, src, out)


def test_minilm_parquet_to_parquet_with_progress(minilm_bundle, sentences, tmp_path):
    """The real model through the command as users run it: vectors equal Encoder.encode,
    ids kept, a tqdm bar with sent/s on stderr (600 sentences: MiniLM is slow on 2 cores)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from angle_rt import Encoder

    texts = sentences[:600]
    src, out = tmp_path / "corpus.parquet", tmp_path / "vectors.parquet"
    pq.write_table(pa.table({"id": [f"doc-{i}" for i in range(600)], "text": texts}), src)
    cmd = [sys.executable, "-m", "angle_rt.embed", str(minilm_bundle), str(src), str(out),
           "--id-column", "id", "--chunk-size", "256", "--progress"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "sent/s" in run.stderr and "wrote 600 vectors (384-d, float32)" in run.stderr
    ids, vecs, _ = read_output(out)
    assert ids == [f"doc-{i}" for i in range(600)]
    with Encoder(minilm_bundle) as enc:
        ref = enc.encode(texts)
    assert cosine_rows(vecs, ref).min() >= 0.99999


@pytest.fixture(scope="module")
def minilm_alone(minilm_precisions, sentences) -> tuple[list[str], np.ndarray]:
    """300 real sentences and each one's vector encoded alone by the default CPU artifact."""
    texts = sentences[:300]
    with Encoder(minilm_precisions) as enc:
        assert enc.artifact.precision == "int8-dynamic"
        return texts, np.stack([enc.encode(t) for t in texts])


@pytest.mark.parametrize("suffix", [".parquet", ".npy"])
def test_default_artifact_vectors_ignore_chunking_and_resume(minilm_precisions, minilm_alone,
                                                             tmp_path, monkeypatch, suffix):
    """The corpus job with the default CPU artifact (int8-dynamic): any chunk size, and a run
    crashed mid-job then resumed, give every text the vector `encode` gives it alone."""
    texts, alone = minilm_alone
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n"
                           for i, t in enumerate(texts)))
    for chunk in (7, 64, 300):
        out = tmp_path / f"c{chunk}" / f"out{suffix}"
        embed_file(minilm_precisions, src, out, id_column="id", chunk_size=chunk)
        ids, vecs, _ = read_output(out)
        assert ids == [f"d{i}" for i in range(300)]
        # bit for bit: mean pooling sums in token order (3-5e-8 apart with ReduceSum)
        assert np.array_equal(vecs, alone), chunk
    out = tmp_path / "resumed" / f"out{suffix}"
    with monkeypatch.context() as m:
        _crash_on(m, w.Writer, "save_state", 3)  # two chunks done, the third staged
        with pytest.raises(_Crash):
            embed_file(minilm_precisions, src, out, id_column="id", chunk_size=64)
    embed_file(minilm_precisions, src, out, id_column="id", chunk_size=64)
    ids, vecs, _ = read_output(out)
    assert ids == [f"d{i}" for i in range(300)]
    assert np.array_equal(vecs, alone)


@pytest.fixture(scope="module")
def corpus_2000(corpus_dir, tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("c2000") / "in.jsonl"
    src.write_text("\n".join((corpus_dir / "corpus.jsonl").read_text().splitlines()[:2000])
                   + "\n")
    return src


def test_parquet_output_is_compact_and_every_engine_reads_it(minilm_precisions, corpus_2000,
                                                            tmp_path):
    """int8 and packed bits were no smaller than float32 in Parquet (int8 has no 8-bit
    physical type, compression was off): now zstd, a dictionary for int8 codes, byte-stream
    split for float32 and fixed_size_binary for bits; float32 and int8 Parquet (ids
    included) are smaller than the .npy vectors alone. DuckDB, Polars and pyarrow.dataset
    read the vectors back as written."""
    import duckdb
    import polars as pl
    import pyarrow as pa
    import pyarrow.dataset as ds

    sizes = {}
    for dtype in ("float32", "int8", "binary"):
        for out in (tmp_path / f"{dtype}.parquet", tmp_path / f"{dtype}.npy"):
            embed_file(minilm_precisions, corpus_2000, out, id_column="id", output_dtype=dtype)
            sizes[out.name] = out.stat().st_size
        _, vecs, _ = read_output(tmp_path / f"{dtype}.parquet")
        np.testing.assert_array_equal(vecs, np.load(tmp_path / f"{dtype}.npy"))
    print("bytes:", sizes)
    assert sizes["float32.parquet"] < sizes["float32.npy"]
    assert sizes["int8.parquet"] < sizes["int8.npy"]
    assert sizes["binary.parquet"] <= 1.6 * sizes["binary.npy"]
    table = ds.dataset(tmp_path / "binary.parquet").to_table()
    assert table.schema.field("embedding").type == pa.binary(48)
    assert ds.dataset(tmp_path / "int8.parquet").to_table().schema.field(
        "embedding").type == pa.list_(pa.int8(), 384)
    _, int8_vecs, _ = read_output(tmp_path / "int8.parquet")
    con = duckdb.connect()
    first = con.execute(f"SELECT id, embedding FROM '{tmp_path / 'int8.parquet'}' "
                        "ORDER BY id LIMIT 1").fetchone()
    assert first[0] == "doc-0" and list(first[1]) == int8_vecs[0].tolist()
    frame = pl.read_parquet(tmp_path / "float32.parquet")
    _, f32, _ = read_output(tmp_path / "float32.parquet")
    np.testing.assert_array_equal(np.stack(frame["embedding"].to_list()).astype(np.float32),
                                  f32)
    last = con.execute(f"SELECT embedding FROM '{tmp_path / 'float32.parquet'}' "
                       f"WHERE id = 'doc-{len(f32) - 1}'").fetchone()
    np.testing.assert_array_equal(np.asarray(last[0], dtype=np.float32), f32[-1])


def test_calibrated_ranges_give_every_shard_one_code_book(minilm_precisions, corpus_2000,
                                                         tmp_path, capsys):
    """Two halves of one corpus, each calibrating on its own first chunk, disagreed on most
    codes. `angle-rt calibrate` writes ranges once; with --output-ranges both halves get
    the codes the whole corpus gets, and the server reads the same file."""
    from angle_rt.cli import main as rt_main
    from angle_rt.quantization import read_ranges

    lines = corpus_2000.read_text().splitlines()
    halves = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    halves[0].write_text("\n".join(lines[:1000]) + "\n")
    halves[1].write_text("\n".join(lines[1000:]) + "\n")
    ranges = tmp_path / "ranges.npy"
    assert rt_main(["calibrate", str(minilm_precisions), str(corpus_2000), str(ranges),
                    "--rows", "500"]) == 0
    assert "384-d int8/uint8 ranges" in capsys.readouterr().err
    assert read_ranges(ranges).shape == (2, 384)  # what `angle-rt serve --output-ranges` reads
    flags = ["--id-column", "id", "--output-dtype", "int8", "-q", "--chunk-size", "500"]
    whole = tmp_path / "whole.parquet"
    assert main([str(minilm_precisions), str(corpus_2000), str(whole), *flags,
                 "--output-ranges", str(ranges)]) == 0
    shared, own = [], []
    for i, half in enumerate(halves):
        out = tmp_path / f"h{i}.parquet"
        assert main([str(minilm_precisions), str(half), str(out), *flags,
                     "--output-ranges", str(ranges)]) == 0
        shared.append(read_output(out)[1])
        alone = tmp_path / f"own{i}.parquet"
        assert main([str(minilm_precisions), str(half), str(alone), *flags]) == 0
        own.append(read_output(alone)[1])
    np.testing.assert_array_equal(np.concatenate(shared), read_output(whole)[1])
    assert (own[0] != shared[0]).any()  # calibrated on their own first chunk: other codes
    assert main([str(minilm_precisions), str(halves[0]), str(tmp_path / "f.parquet"),
                 "--output-ranges", str(ranges), "-q"]) == 2  # float32 takes no ranges
    assert "applies to int8/uint8 output" in capsys.readouterr().err
    np.save(tmp_path / "bad.npy", np.zeros((2, 7), np.float32))
    assert main([str(minilm_precisions), str(halves[0]), str(tmp_path / "g.parquet"), *flags,
                 "--output-ranges", str(tmp_path / "bad.npy")]) == 2
    assert "7-d ranges" in capsys.readouterr().err


def test_readers_take_what_other_tools_write(tiny_bert_bundle, tiny_encoder, tmp_path, capsys):
    """Spark/Hive folders (`_temporary/`, hidden folders, `_SUCCESS`), a CSV with a byte-order
    mark, dictionary-encoded strings: read as the data they hold."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"sentence number {i}" for i in range(30)]
    ds_dir = tmp_path / "spark"
    (ds_dir / "_temporary" / "0").mkdir(parents=True)
    (ds_dir / ".hidden").mkdir()
    table = pa.table({"id": [f"d{i}" for i in range(30)], "text": texts})
    pq.write_table(table.slice(0, 20), ds_dir / "part-0.parquet")
    pq.write_table(table.slice(20), ds_dir / "part-1.parquet")
    (ds_dir / "_temporary" / "0" / "part-9.parquet").write_bytes(b"half-written")
    pq.write_table(table, ds_dir / ".hidden" / "copy.parquet")
    (ds_dir / "_SUCCESS").write_bytes(b"")
    r = embed_file(tiny_bert_bundle, ds_dir, tmp_path / "a.npy", id_column="id")
    assert r.rows == 30
    dict_file = tmp_path / "dict.parquet"
    pq.write_table(table.set_column(1, "text", table.column("text").dictionary_encode()),
                   dict_file)
    embed_file(tiny_bert_bundle, dict_file, tmp_path / "b.npy", id_column="id")
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbfid,text\n" + "".join(f"d{i},{t}\n" for i, t in
                                                        enumerate(texts)).encode())
    embed_file(tiny_bert_bundle, bom, tmp_path / "c.npy", id_column="id")
    for name in ("a.npy", "b.npy", "c.npy"):
        ids, vecs, _ = read_output(tmp_path / name)
        assert ids == [f"d{i}" for i in range(30)], name
        assert cosine_rows(vecs, tiny_encoder.encode(texts)).min() >= 0.99999


@pytest.mark.parametrize("where", [0, 7])
def test_undecodable_rows_are_bad_rows_wherever_they_are(tiny_bert_bundle, tmp_path, capsys,
                                                         where):
    """A CSV byte that is not UTF-8 and a JSONL line that is not JSON are bad rows: exit 1
    naming the row (the same code in the first row as later: it was 2 or 1 by position), or
    skipped and listed with --on-bad-row skip."""
    csv_lines = [f"d{i},sentence number {i}".encode() for i in range(10)]
    csv_lines[where] = f"d{where},caf".encode() + b"\xe9 latin-1"
    jsonl_lines = [json.dumps({"id": f"d{i}", "text": f"sentence number {i}"}).encode()
                   for i in range(10)]
    jsonl_lines[where] = b'{"id": "d%d", "text": "cut off' % where
    files = {"in.csv": b"id,text\n" + b"\n".join(csv_lines) + b"\n",
             "in.jsonl": b"\n".join(jsonl_lines) + b"\n"}
    for name, data in files.items():
        src = tmp_path / name
        src.write_bytes(data)
        out = tmp_path / f"{name}.parquet"
        assert main([str(tiny_bert_bundle), str(src), str(out), "--id-column", "id",
                     "-q"]) == 1, name
        assert f"row {where}" in capsys.readouterr().err
        out = tmp_path / f"{name}-skip.parquet"
        assert main([str(tiny_bert_bundle), str(src), str(out), "--id-column", "id",
                     "--on-bad-row", "skip", "-q"]) == 0, name
        (listed,) = [json.loads(x) for x in out.with_name(out.name + ".skipped.jsonl")
                     .read_text().splitlines()]
        assert listed["row"] == where
        assert ("not valid JSON" if name == "in.jsonl" else "not valid Unicode") in \
            listed["reason"]
        assert read_output(out)[0] == [f"d{i}" for i in range(10) if i != where]


@pytest.mark.parametrize("suffix", [".parquet", ".npy", ""])
def test_csv_rows_as_spreadsheets_write_them(tiny_bert_bundle, tiny_encoder, tmp_path,
                                             suffix):
    """Blank lines (a trailing one too) are no rows (they stopped the job as null ids);
    a row with more or fewer fields than the header is a bad row (an unquoted comma cut
    its text short, silently); an id that is not UTF-8 is a bad row (it failed the write
    mid-job, or was written as other bytes to .npy)."""
    src = tmp_path / "in.csv"
    src.write_bytes(b"id,text\r\nd0,first sentence\r\n\r\nd1,Hello, world and more\n"
                    b'd2,"a quoted, fine one"\nd3\ncaf\xe9,latin-1 id\nd4,last one\n\n\n')
    out = tmp_path / f"o{suffix}"
    r = embed_file(tiny_bert_bundle, src, out, id_column="id", on_bad_row="skip")
    ids, vecs, _ = read_output(out)
    assert ids == ["d0", "d2", "d4"] and (r.rows, r.skipped) == (3, 3)
    want = tiny_encoder.encode(["first sentence", "a quoted, fine one", "last one"])
    assert np.array_equal(vecs, want)
    listed = [json.loads(x) for x in Path(str(out) + ".skipped.jsonl").read_text().splitlines()]
    assert [(x["row"], x["reason"]) for x in listed] == [
        (1, "CSV row has 3 columns, the header 2"), (3, "CSV row has 1 columns, the header 2"),
        (4, "id is not valid UTF-8")]
    with pytest.raises(InputError, match=r"row 1 \(id 'd1'\): CSV row has 3 columns"):
        embed_file(tiny_bert_bundle, src, tmp_path / f"e{suffix}", id_column="id")
    if suffix == ".npy":  # a job under the old rule (blank lines counted) does not resume
        record = tmp_path / "o.npy.json"
        meta = json.loads(record.read_text())
        del meta["fingerprint"]["input"]["row_rules"]
        record.write_text(json.dumps(meta))
        with pytest.raises(OutputExistsError, match=r"input\.row_rules"):
            embed_file(tiny_bert_bundle, src, out, id_column="id", on_bad_row="skip")


def test_inputs_that_once_lost_rows_or_crashed(tiny_bert_bundle, tiny_encoder, tmp_path):
    """A CSV quote left open took every later row into one text (rows gone, exit 0); a
    JSONL id with a lone surrogate crashed the Parquet write with no row named; Parquet
    with the id column equal to the text column raised IndexError."""
    src = tmp_path / "in.csv"
    src.write_text('id,text\na,first\nb,"oops unterminated\nc,third\nd,fourth\n')
    for skip in ("error", "skip"):
        with pytest.raises(InputError, match="unreadable CSV"):
            embed_file(tiny_bert_bundle, src, tmp_path / f"q-{skip}.npy", id_column="id",
                       on_bad_row=skip)
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "text": "one"}\n{"id": "b\\ud800", "text": "two"}\n'
                   '{"id": "c", "text": "three"}\n')
    out = tmp_path / "s.parquet"
    r = embed_file(tiny_bert_bundle, src, out, id_column="id", on_bad_row="skip")
    assert (r.rows, r.skipped) == (2, 1) and read_output(out)[0] == ["a", "c"]
    with pytest.raises(InputError, match=r"row 1 .*id is not valid Unicode"):
        embed_file(tiny_bert_bundle, src, tmp_path / "e.parquet", id_column="id")
    src.write_text('{"id": {"a": 1}, "text": "x"}\n{"id": {"a": 2, "b": 3}, "text": "y"}\n')
    with pytest.raises(InputError, match=r"row 0 .*id is a JSON object"):  # "b" was dropped
        embed_file(tiny_bert_bundle, src, tmp_path / "o.parquet", id_column="id", chunk_size=2)
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = ["first text", "second text"]
    pq.write_table(pa.table({"text": texts}), tmp_path / "in.parquet")
    out = tmp_path / "same.parquet"
    embed_file(tiny_bert_bundle, tmp_path / "in.parquet", out, id_column="text")
    ids, vecs, _ = read_output(out, "text")
    assert ids == texts and np.array_equal(vecs, tiny_encoder.encode(texts))



@pytest.mark.parametrize("suffix", [".parquet", ".npy"])
def test_array_ids_and_a_bad_first_id(tiny_bert_bundle, tiny_encoder, tmp_path, suffix):
    """Array ids of another element type than the first ones ([1, 2] then ["a"]) failed the
    Parquet job mid-way even with --on-bad-row skip ("ids of one chunk do not share a
    type", rc 1); a first row whose id was bad itself (an object) set the id type, so every
    later good row was skipped as "id is int, but the ids before it are dict". Now both
    are bad rows, in every output format, and the first *good* id sets the type."""
    rows = [({"a": 1}, "object first"), ([1, 2], "one"), ([3, None], "two"),
            (["a", "b"], "strings"), ([1.5], "float"), ([[1]], "nested"), ([1, "x"], "mixed"),
            ([], "empty"), ([None], "only null"), ([2**70], "past int64"),
            ([{"k": 1}], "object inside"), (["b\ud800"], "surrogate"), ([7], "last")]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in rows))
    out = tmp_path / f"o{suffix}"
    r = embed_file(tiny_bert_bundle, src, out, id_column="id", on_bad_row="skip",
                   chunk_size=3)
    ids, vecs, _ = read_output(out)
    assert ids == [[1, 2], [3, None], [7]] and (r.rows, r.skipped) == (3, 10)
    assert np.array_equal(vecs, tiny_encoder.encode(["one", "two", "last"]))
    listed = [json.loads(x) for x in Path(f"{out}.skipped.jsonl").read_text().splitlines()]
    assert [x["row"] for x in listed] == [0, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert "object" in listed[0]["reason"] and "list[str]" in listed[1]["reason"]
    src.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in rows[1:4]))
    with pytest.raises(InputError, match=r"row 2 .*id is list\[str\], but the ids before"):
        embed_file(tiny_bert_bundle, src, tmp_path / f"e{suffix}", id_column="id")
    from angle_rt.embed.job import id_problem

    assert id_problem([1, 2], "list") is None  # a job record from before typed arrays resumes


def test_a_jsonl_whose_first_record_lacks_the_text_is_a_bad_row(tiny_bert_bundle,
                                                                 tiny_encoder, tmp_path):
    """The column check read the first good record alone: a first record without the text
    refused the whole file at open, even with --on-bad-row skip (nothing written). Now a
    column none of the first records has is refused (a wrong flag), and one that only some
    lack makes those rows bad."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 1, "body": "no text"}\n{"id": 2, "text": "hello"}\nnot json\n'
                   '{"id": 4, "text": "world"}\n')
    out = tmp_path / "o.parquet"
    r = embed_file(tiny_bert_bundle, src, out, id_column="id", on_bad_row="skip")
    ids, vecs, _ = read_output(out)
    assert ids == [2, 4] and (r.rows, r.skipped) == (2, 2)
    assert np.array_equal(vecs, tiny_encoder.encode(["hello", "world"]))
    with pytest.raises(InputError, match=r"row 0 .*id 1"):
        embed_file(tiny_bert_bundle, src, tmp_path / "e.parquet", id_column="id")
    with pytest.raises(InputError, match=r"any of its first 3 records\) has no column 'txt' "
                                         r"\(--text-column\); its columns: 'id', 'body', 'text'"):
        embed_file(tiny_bert_bundle, src, tmp_path / "w.parquet", text_column="txt")
    src.write_text("not json\n[1, 2]\n")  # no record at all: not JSON Lines, refused
    with pytest.raises(InputError, match=r"in\.jsonl:1 is not valid JSON"):
        embed_file(tiny_bert_bundle, src, tmp_path / "n.parquet", on_bad_row="skip")


@pytest.mark.parametrize("suffix", [".parquet", ".npy", ""])
def test_overwrite_keeps_the_old_output_until_the_new_one_is_complete(
        tiny_bert_bundle, corpus_dir, tmp_path, monkeypatch, suffix):
    """--overwrite deleted the old output before the new one existed: a crash in between
    left nothing. Now the old output stays whole until the new one replaces it."""
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join((corpus_dir / "corpus.jsonl").read_text().splitlines()[:300])
                   + "\n")
    out = tmp_path / f"out{suffix}"
    embed_file(tiny_bert_bundle, src, out, id_column="id", chunk_size=100)
    old = read_output(out)
    with monkeypatch.context() as m:
        _crash_on(m, w.Writer, "save_state", 3)
        with pytest.raises(_Crash):
            embed_file(tiny_bert_bundle, src, out, id_column="id", chunk_size=100,
                       normalize=True, overwrite=True)
    still = read_output(out)
    assert still[0] == old[0] and not still[2]["fingerprint"]["normalize"]
    np.testing.assert_array_equal(still[1], old[1])
    embed_file(tiny_bert_bundle, src, out, id_column="id", chunk_size=100, normalize=True,
               overwrite=True)
    ids, vecs, meta = read_output(out)
    assert ids == old[0] and meta["fingerprint"]["normalize"]
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_resume_follows_the_inputs_content_not_its_mtime(tiny_bert_bundle, corpus_dir,
                                                         tmp_path, monkeypatch):
    """Change detection was path + size + mtime: an edit that kept both resumed onto the
    old rows, a touch refused. Now the content decides (size + head/tail sha256)."""
    src = tmp_path / "in.txt"
    lines = (corpus_dir / "corpus.txt").read_text().splitlines()[:300]
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.parquet"

    def interrupted() -> None:
        with monkeypatch.context() as m:
            _crash_on(m, w.Writer, "save_state", 3)
            with pytest.raises(_Crash):
                embed_file(tiny_bert_bundle, src, out, chunk_size=100)

    interrupted()
    os.utime(src, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched: same bytes
    assert embed_file(tiny_bert_bundle, src, out, chunk_size=100).resumed_from == 100
    w.remove(out)
    interrupted()
    st = src.stat()
    src.write_text("\n".join(["X" + lines[0][1:], *lines[1:]]) + "\n")  # same size
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same mtime
    with pytest.raises(OutputExistsError, match=r"differs in: input\.files"):
        embed_file(tiny_bert_bundle, src, out, chunk_size=100)


@pytest.mark.parametrize("suffix", [".parquet", ".npy"])
def test_an_id_of_another_type_is_a_bad_row(tiny_bert_bundle, tmp_path, capsys, suffix):
    """JSONL ids "d0" ... then 7: the Parquet write failed mid-job (ids of one column must
    share a type). Now that row is a bad row in every format: exit 1 naming it, or skipped."""
    rows = [{"id": f"d{i}", "text": f"sentence number {i}"} for i in range(300)]
    rows[250]["id"] = 7
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [str(tiny_bert_bundle), str(src), "--id-column", "id", "--chunk-size", "100", "-q"]
    assert main([args[0], args[1], str(tmp_path / f"a{suffix}"), *args[2:]]) == 1
    assert "row 250 (id 7): id is int, but the ids before it are str" in capsys.readouterr().err
    out = tmp_path / f"b{suffix}"
    assert main([args[0], args[1], str(out), *args[2:], "--on-bad-row", "skip"]) == 0
    assert read_output(out)[0] == [f"d{i}" for i in range(300) if i != 250]


@pytest.mark.parametrize("suffix", [".parquet", ".npy"])
def test_an_id_past_int64_is_a_bad_row(tiny_bert_bundle, tmp_path, capsys, suffix):
    """A JSONL id of 2**70 among small ints stopped a Parquet job (exit 1 naming no row,
    --on-bad-row skip or not) while .npy took it: a bad row in every format."""
    rows = [{"id": i, "text": f"sentence number {i}"} for i in range(30)]
    rows[15]["id"] = 2**70
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [str(tiny_bert_bundle), str(src), "--id-column", "id", "--chunk-size", "10", "-q"]
    assert main([args[0], args[1], str(tmp_path / f"a{suffix}"), *args[2:]]) == 1
    assert f"row 15 (id {2**70}): id is an integer past int64" in capsys.readouterr().err
    out = tmp_path / f"b{suffix}"
    assert main([args[0], args[1], str(out), *args[2:], "--on-bad-row", "skip"]) == 0
    assert read_output(out)[0] == [i for i in range(30) if i != 15]


def test_rows_per_file_regroups_a_directory_output(tiny_bert_bundle, corpus_dir, tmp_path,
                                                   monkeypatch):
    """One ~6 MB file per 4,096-row chunk made many small files: --rows-per-file N writes
    files of N rows at the end, in input order; killed while regrouping, the rerun gives
    the same files."""
    import pyarrow.parquet as pq

    src = tmp_path / "in.jsonl"
    src.write_text("\n".join((corpus_dir / "corpus.jsonl").read_text().splitlines()[:600])
                   + "\n")
    kw = {"id_column": "id", "chunk_size": 100, "rows_per_file": 250}
    ref = tmp_path / "ref"
    embed_file(tiny_bert_bundle, src, ref, **kw)
    files = sorted(ref.glob("*.parquet"))
    assert [f.name for f in files] == [f"part-{i:06d}.parquet" for i in range(3)]
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [250, 250, 100]
    ids, _, _ = read_output(ref)
    assert ids == [f"doc-{i}" for i in range(600)]
    plain, _, _ = read_output(embed_file(tiny_bert_bundle, src, tmp_path / "plain",
                                         id_column="id", chunk_size=100).output)
    assert plain == ids
    for name, target in [("files written, not renamed", "move_if_present"),
                         ("regrouped, no record", "regroup")]:
        out = tmp_path / name.replace(" ", "_").replace(",", "")
        with monkeypatch.context() as m:
            if target == "regroup":
                real = w.regroup

                def regroup_then_die(*a, _real=real, **k):
                    _real(*a, **k)
                    raise _Crash("after regrouping")
                m.setattr(w, "regroup", regroup_then_die)
            else:
                _crash_on(m, w, target, 1)
            with pytest.raises(_Crash):
                embed_file(tiny_bert_bundle, src, out, **kw)
        assert not out.exists(), name
        embed_file(tiny_bert_bundle, src, out, **kw)
        got = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
        assert got == {p.name: p.read_bytes() for p in sorted(ref.iterdir())}, name
    with pytest.raises(ValueError, match="applies to a directory OUTPUT"):
        embed_file(tiny_bert_bundle, src, tmp_path / "x.parquet", rows_per_file=10)


def test_every_reader_resumes_at_any_row(tmp_path):
    """chunks(size, skip) is the input from row `skip` on, for every format, whatever its
    row groups: after the group it started in, the Parquet reader once kept skipping later
    groups it was short enough to skip (groups 1000, 1000, 500 from row 1800: 500 rows
    lost, 500 twice, and without an id column 700 rows got another text's vector)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from angle_rt.embed.readers import open_input

    n = 2500
    table = pa.table({"id": [f"d{i}" for i in range(n)], "text": [f"t{i}" for i in range(n)]})
    pq.write_table(table, tmp_path / "uneven.parquet", row_group_size=1000)
    parts = tmp_path / "parts"
    parts.mkdir()
    for name, (lo, hi, group) in {"a": (0, 1300, 600), "b": (1300, 1700, 400),
                                  "c": (1700, n, 250)}.items():
        pq.write_table(table.slice(lo, hi - lo), parts / f"{name}.parquet", row_group_size=group)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": f"t{i}"}) + "\n"
                                              for i in range(n)))
    for path in (tmp_path / "uneven.parquet", parts, tmp_path / "c.jsonl"):
        for skip in (0, 1, 599, 600, 1000, 1299, 1300, 1800, 1999, 2000, 2400, 2499, 2500):
            for id_column in ("id", None):
                chunks = list(open_input(path, "text", id_column).chunks(700, skip))
                texts = [t for c in chunks for t in c.texts]
                ids = [i for c in chunks for i in c.ids]
                assert texts == [f"t{i}" for i in range(skip, n)], (path.name, skip)
                assert ids == ([f"d{i}" for i in range(skip, n)] if id_column
                               else list(range(skip, n))), (path.name, skip)
                assert [c.start for c in chunks] == list(range(skip, n, 700))
