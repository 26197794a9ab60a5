"""`angle-rt embed` with remote input and output (pyarrow.fs URIs), against a local
S3-compatible server (moto's server mode, tests/embed/conftest.py: s3_server)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from angle_rt.embed import OutputExistsError, embed_file
from angle_rt.embed import lock as lock_mod
from angle_rt.embed.cli import main
from angle_rt.embed.errors import OutputLockedError
from angle_rt.embed.fs import Location
from angle_rt.embed.remote import RemoteParquetWriter
from angle_rt.embed.writers import column_vectors
from tests.embed._util import read_output

pytestmark = pytest.mark.usefixtures("s3_server")


@pytest.fixture(autouse=True)
def quick_lease(monkeypatch):
    monkeypatch.setattr(lock_mod, "LEASE_SETTLE", 0.05)


def upload(local, uri: str) -> None:
    Location.parse(uri).write_bytes(local.read_bytes())


def read_remote(uri: str) -> tuple[list, np.ndarray, dict]:
    """(ids, vectors, job record) of a remote .parquet or dataset directory, read with
    pyarrow.dataset on the S3 filesystem as a query engine would."""
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    where = Location.parse(uri)
    if where.suffix == ".parquet":
        table = pq.read_table(where.path, filesystem=where.fs)
        meta = json.loads(table.schema.metadata[b"angle_rt.embed"])
    else:
        table = ds.dataset(where.path, filesystem=where.fs, format="parquet").to_table()
        meta = json.loads(where.child("_angle_rt_embed.json").read_bytes())
    return table.column("id").to_pylist(), column_vectors(table.column("embedding"),
                                                          meta["dtype"]), meta


@pytest.mark.parametrize("name", ["vecs.parquet", "vecs"])
def test_s3_input_and_output_give_the_local_jobs_vectors(tiny_bert_bundle, corpus_dir,
                                                         tmp_path, s3_bucket, name):
    upload(corpus_dir / "corpus.jsonl", f"{s3_bucket}/in/corpus.jsonl")
    kw = {"id_column": "id", "chunk_size": 700, "output_dtype": "int8"}
    local = embed_file(tiny_bert_bundle, corpus_dir / "corpus.jsonl", tmp_path / name, **kw)
    out = f"{s3_bucket}/out/{name}"
    r = embed_file(tiny_bert_bundle, f"{s3_bucket}/in/corpus.jsonl", out, **kw)
    assert r.rows == local.rows == 2758 and str(r.output) == out
    ids, vecs, meta = read_remote(out)
    want_ids, want_vecs, want_meta = read_output(local.output)
    assert ids == want_ids
    np.testing.assert_array_equal(vecs, want_vecs)
    assert meta["ranges"] == want_meta["ranges"]
    assert meta["fingerprint"]["input"]["path"] == f"{s3_bucket}/in/corpus.jsonl"
    assert not Location.parse(out + ".partial").exists()
    assert not Location.parse(out + ".lock").exists()
    again = embed_file(tiny_bert_bundle, f"{s3_bucket}/in/corpus.jsonl", out, **kw)
    assert again.complete_before and again.rows == 2758
    with pytest.raises(OutputExistsError, match=r"differs in: .*chunk_size"):
        embed_file(tiny_bert_bundle, f"{s3_bucket}/in/corpus.jsonl", out,
                   **{**kw, "chunk_size": 500})


def test_s3_parquet_directory_input_and_rows_per_file(tiny_bert_bundle, corpus_dir,
                                                      s3_bucket):
    for f in ("a.parquet", "b.parquet"):
        upload(corpus_dir / "parts" / f, f"{s3_bucket}/parts/{f}")
    upload(corpus_dir / "parts" / "a.parquet", f"{s3_bucket}/parts/_temporary/x.parquet")
    out = f"{s3_bucket}/out/grouped"
    assert main([str(tiny_bert_bundle), f"{s3_bucket}/parts", out, "--id-column", "id",
                 "--chunk-size", "400", "--rows-per-file", "1000", "-q"]) == 0
    where = Location.parse(out)
    names = sorted(f.name for f in where.files())
    assert names == ["_angle_rt_embed.json", "part-000000.parquet", "part-000001.parquet",
                     "part-000002.parquet"]
    ids, _, meta = read_remote(out)
    assert ids == [f"doc-{i}" for i in range(2758)] and meta["rows"] == 2758


# kill points of the remote writer: each raises once, then a rerun must give the same output
REMOTE_CRASH_POINTS = [
    ("chunk staged, state not saved", RemoteParquetWriter, "save_state", 3),
    ("skipped list written, state not saved", RemoteParquetWriter, "append_skipped", 2),
    ("a part half copied into OUTPUT/", Location, "copy_to", 2),
    ("published, staging not cleaned", RemoteParquetWriter, "finish_side_files", 1),
]


class _Crash(BaseException):
    pass


def _crash_on(monkeypatch, target, name: str, call: int) -> None:
    real, n = getattr(target, name), [0]

    def wrapped(*a, **k):
        n[0] += 1
        if n[0] == call:
            raise _Crash(f"{name} call {call}")
        return real(*a, **k)

    monkeypatch.setattr(target, name, wrapped)


@pytest.mark.parametrize("name", ["out.parquet", "out"])
def test_s3_crash_at_any_point_resumes_to_the_same_output(tiny_bert_bundle, corpus_dir,
                                                          tmp_path, s3_bucket, monkeypatch,
                                                          name):
    lines = (corpus_dir / "corpus.jsonl").read_text().splitlines()[:600]
    lines[130] = '{"id": "bad-1", "text": null}'
    lines[450] = '{"id": "bad-2", "text": 7}'
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    kw = {"id_column": "id", "chunk_size": 100, "on_bad_row": "skip", "output_dtype": "int8"}
    ref = f"{s3_bucket}/ref/{name}"
    embed_file(tiny_bert_bundle, src, ref, **kw)
    want = read_remote(ref)
    want_skipped = Location.parse(ref + ".skipped.jsonl").read_bytes()
    assert [json.loads(x)["id"] for x in want_skipped.splitlines()] == ["bad-1", "bad-2"]
    for i, (what, target, method, call) in enumerate(REMOTE_CRASH_POINTS):
        if method == "copy_to" and name.endswith(".parquet"):
            continue  # a single file is put whole: no copy step
        out = f"{s3_bucket}/run{i}/{name}"
        with monkeypatch.context() as m:
            _crash_on(m, target, method, call)
            with pytest.raises(_Crash):
                embed_file(tiny_bert_bundle, src, out, **kw)
        r = embed_file(tiny_bert_bundle, src, out, **kw)
        assert (r.rows, r.skipped) == (598, 2), what
        got = read_remote(out)
        assert got[0] == want[0], what
        np.testing.assert_array_equal(got[1], want[1])
        assert Location.parse(out + ".skipped.jsonl").read_bytes() == want_skipped, what
        assert not Location.parse(out + ".partial").exists(), what


def test_s3_lease_refuses_a_live_holder_and_takes_over_a_lapsed_one(tiny_bert_bundle,
                                                                    corpus_dir, s3_bucket):
    out = f"{s3_bucket}/leased"
    lease = Location.parse(out + ".lock")
    holder = {"token": "x", "pid": 4242, "host": "other-host", "started": "then",
              "expires": time.time() + 60}
    lease.write_bytes(json.dumps(holder).encode())
    with pytest.raises(OutputLockedError, match="pid 4242 on other-host"):
        embed_file(tiny_bert_bundle, corpus_dir / "corpus.txt", out)
    assert main([str(tiny_bert_bundle), str(corpus_dir / "corpus.txt"), out, "-q"]) == 2
    assert not Location.parse(out).exists()  # nothing written while refused
    lease.write_bytes(json.dumps({**holder, "expires": time.time() - 1}).encode())
    r = embed_file(tiny_bert_bundle, corpus_dir / "corpus.txt", out)
    assert r.rows == 2758 and not lease.exists()


def test_two_runs_racing_for_one_lease_one_refuses(s3_bucket, monkeypatch):
    """Both write a lease; the one read back decides: exactly one goes on."""
    import threading

    monkeypatch.setattr(lock_mod, "LEASE_SETTLE", 0.5)
    where = Location.parse(f"{s3_bucket}/race")
    results, go = [], threading.Barrier(2)

    def run() -> None:
        go.wait()
        try:
            with lock_mod.lease_lock(where):
                time.sleep(1.0)
                results.append("held")
        except OutputLockedError:
            results.append("refused")

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == ["held", "refused"]


def test_remote_output_formats_and_uris_are_checked(tiny_bert_bundle, corpus_dir, s3_bucket):
    with pytest.raises(ValueError, match="remote output is Parquet"):
        embed_file(tiny_bert_bundle, corpus_dir / "corpus.txt", f"{s3_bucket}/v.npy")
    # a URI pyarrow.fs cannot open is a usage error (2); a missing input an input error (1)
    assert main([str(tiny_bert_bundle), str(corpus_dir / "corpus.txt"),
                 "nosuchscheme://x/y", "-q"]) == 2
    assert main([str(tiny_bert_bundle), f"{s3_bucket}/missing.jsonl",
                 f"{s3_bucket}/o.parquet", "-q"]) == 1
    assert not Location.parse(f"{s3_bucket}/o.parquet.partial").exists()
