"""angle_rt.ray on a local Ray (2 CPUs, loopback only): embed_dataset with 2 actors, a worker
killed mid-job, and `angle-rt embed --ray` against the local job."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.embed._util import read_output

ray = pytest.importorskip("ray", reason="Ray tests need angle-rt[ray]")
# Ray Data's own deprecated settings, warned about when its DataContext is copied to workers
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")

from angle_rt.ray import BundleEmbedder, embed_dataset  # noqa: E402


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """TimeoutError in this (main) thread after `seconds`: a stuck Ray job fails the test
    instead of hanging the suite."""
    def expire(signum, frame):
        raise TimeoutError(f"Ray job still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def local_ray(s3_server):  # S3 env set before Ray starts its workers
    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0"  # loopback only
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def test_embed_dataset_two_actors_survives_a_killed_worker(local_ray, tiny_bert_bundle,
                                                           tiny_encoder, sentences, tmp_path):
    """2,758 sentences through 2 actors; one actor process is SIGKILLed on its second batch
    (once): Ray restarts it and retries the task, and every id comes back exactly once with
    Encoder.encode's vector."""
    marker = tmp_path / "killed"

    class KilledOnce(BundleEmbedder):
        calls = 0

        def __call__(self, batch):
            self.calls += 1
            if self.calls == 2 and not marker.exists():
                marker.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
            return super().__call__(batch)

    ds = ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(sentences)],
                             override_num_blocks=8)
    with deadline(120):
        out = embed_dataset(ds, tiny_bert_bundle, "text", batch_size=256, concurrency=2,
                            udf=KilledOnce).to_arrow_refs()
        table = __import__("pyarrow").concat_tables(ray.get(out))
    assert marker.exists(), "no worker was killed"
    ids = table.column("id").to_pylist()
    assert sorted(ids) == list(range(len(sentences)))  # each id exactly once
    emb = table.column("embedding").combine_chunks()
    vecs = emb.flatten().to_numpy().reshape(-1, emb.type.list_size)
    joined = vecs[np.argsort(ids)]
    np.testing.assert_array_equal(joined, tiny_encoder.encode(sentences))  # one text, one vector


@pytest.mark.slow
def test_cli_ray_equals_the_local_job(local_ray, tiny_bert_bundle, corpus_dir, tmp_path):
    """`--ray` on Parquet without an id column (row numbers), int8 and --on-bad-row skip:
    the same ids, vectors and skipped list as the local command."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from angle_rt.embed.cli import main

    texts = pq.read_table(corpus_dir / "corpus.parquet").column("text").to_pylist()
    texts[3], texts[1500] = None, None
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.table({"text": texts[:2000]}), src / "a.parquet", row_group_size=500)
    pq.write_table(pa.table({"text": texts[2000:]}), src / "b.parquet", row_group_size=500)
    flags = ["--output-dtype", "int8", "--on-bad-row", "skip", "--chunk-size", "500", "-q"]
    assert main([str(tiny_bert_bundle), str(src), str(tmp_path / "local.parquet"), *flags]) == 0
    with deadline(180):
        assert main([str(tiny_bert_bundle), str(src), str(tmp_path / "ray_out"), *flags,
                     "--ray", "--ray-actors", "2"]) == 0
    local_ids, local_vecs, local_meta = read_output(tmp_path / "local.parquet")
    ids, vecs, meta = read_output(tmp_path / "ray_out")
    order = np.argsort(ids)
    assert [ids[i] for i in order] == local_ids
    np.testing.assert_array_equal(vecs[order], local_vecs)
    assert meta["ranges"] == local_meta["ranges"] and meta["skipped"] == 2
    skipped = [json.loads(x)["id"] for x in
               (tmp_path / "ray_out.skipped.jsonl").read_text().splitlines()]
    assert skipped == [3, 1500]
    # rerun: complete already; other arguments: refused
    assert main([str(tiny_bert_bundle), str(src), str(tmp_path / "ray_out"), *flags,
                 "--ray"]) == 0
    assert main([str(tiny_bert_bundle), str(src), str(tmp_path / "ray_out"), "--ray",
                 "-q"]) == 2


@pytest.mark.slow
def test_ship_bundle_and_id_column(local_ray, tiny_bert_bundle, tiny_encoder, corpus_dir,
                                   tmp_path, sentences):
    """JSONL with --id-column read by Ray's JSON reader; the bundle sent through the object
    store (workers read it from a per-node cache, checksums checked)."""
    from angle_rt.ray import embed_files_on_ray

    with deadline(180):
        meta = embed_files_on_ray(tiny_bert_bundle, corpus_dir / "corpus.jsonl",
                                  tmp_path / "out", id_column="id", concurrency=2,
                                  ship_bundle=True, normalize=True, chunk_size=1000)
    assert meta["rows"] == len(sentences)
    ids, vecs, _ = read_output(tmp_path / "out")
    by_id = dict(zip(ids, vecs, strict=True))
    joined = np.stack([by_id[f"doc-{i}"] for i in range(len(sentences))])
    ref = tiny_encoder.encode(sentences, normalize_embeddings=True)
    np.testing.assert_array_equal(joined, ref)
    assert Path(tmp_path / "out" / "_angle_rt_embed.json").is_file()


def test_ray_vectors_equal_encode_with_the_default_artifact(local_ray, minilm_precisions,
                                                            sentences):
    """Ray batches rows its own way (blocks, actors): with the default CPU artifact
    (int8-dynamic, per-token scales) every row still gets the vector `encode` gives it."""
    import ray.data

    from angle_rt import Encoder

    texts = sentences[:256]
    with Encoder(minilm_precisions) as enc:
        assert enc.artifact.precision == "int8-dynamic"
        alone = np.stack([enc.encode(t) for t in texts])
    ds = ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(texts)],
                             override_num_blocks=3)
    with deadline(180):
        rows = embed_dataset(ds, minilm_precisions, concurrency=2, batch_size=37).take_all()
    rows.sort(key=lambda r: r["id"])
    assert [r["id"] for r in rows] == list(range(256))
    got = np.stack([np.asarray(r["embedding"], dtype=np.float32) for r in rows])
    np.testing.assert_array_equal(got, alone)


def test_ray_csv_types_all_bad_batches_and_bad_row_errors(local_ray, tiny_bert_bundle,
                                                         tiny_encoder, tmp_path, capsys):
    """`--ray` on CSV keeps every value a string (id "007", text "42" were inferred as
    numbers); a batch whose rows are all bad is skipped (it crashed); under
    --on-bad-row error a bad row exits 1 with one line naming it (was Ray's 52-line
    traceback) and leaves no staging behind."""
    from angle_rt.embed.cli import main

    src = tmp_path / "in.csv"
    src.write_text("id,text\n007,42\n" + "".join(f"{i:03d},sentence number {i}\n"
                                                 for i in range(8, 40)))
    flags = ["--id-column", "id", "--ray", "--ray-actors", "1", "--chunk-size", "16", "-q"]
    with deadline(180):
        assert main([str(tiny_bert_bundle), str(src), str(tmp_path / "csv"), *flags]) == 0
    ids, vecs, _ = read_output(tmp_path / "csv")
    assert sorted(ids) == ["007"] + [f"{i:03d}" for i in range(8, 40)]
    k = ids.index("007")
    np.testing.assert_array_equal(vecs[k:k + 1], tiny_encoder.encode(["42"]))
    jsonl = tmp_path / "in.jsonl"
    rows = [{"id": f"g{i}", "text": f"sentence number {i}"} for i in range(16)]
    rows += [{"id": f"b{i}", "text": None} for i in range(48)]  # whole batches of bad rows
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with deadline(180):
        assert main([str(tiny_bert_bundle), str(jsonl), str(tmp_path / "skip"), *flags,
                     "--on-bad-row", "skip"]) == 0
    ids, _, meta = read_output(tmp_path / "skip")
    assert sorted(ids) == sorted(f"g{i}" for i in range(16)) and meta["skipped"] == 48
    capsys.readouterr()
    with deadline(180):
        code = main([str(tiny_bert_bundle), str(jsonl), str(tmp_path / "strict"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "null text" in err, err
    assert not (tmp_path / "strict.partial").exists()
    short = tmp_path / "short.csv"  # a row without its text column
    short.write_text("id,text\na,first\nb\nc,third\n")
    with deadline(180):
        code = main([str(tiny_bert_bundle), str(short), str(tmp_path / "short"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "column" in err, err
    with deadline(180):
        assert main([str(tiny_bert_bundle), str(short), str(tmp_path / "short"), *flags,
                     "--on-bad-row", "skip"]) == 0
    ids, _, meta = read_output(tmp_path / "short")
    assert sorted(ids) == ["a", "c"] and meta["skipped"] == 1
    listed = json.loads((tmp_path / "short.skipped.jsonl").read_text())
    assert listed["line"] == 3 and "columns" in listed["reason"]


def test_ray_reads_and_writes_s3(local_ray, tiny_bert_bundle, corpus_dir, tmp_path,
                                 s3_bucket):
    """`--ray` with Parquet input (row numbers, one task per row group) and output on the
    local S3 server, bad rows listed by the actors on S3: the local job's ids and vectors."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from angle_rt.embed.cli import main
    from angle_rt.embed.fs import Location
    from tests.embed.test_remote import read_remote

    texts = pq.read_table(corpus_dir / "corpus.parquet").column("text").to_pylist()[:1200]
    texts[7] = None
    pq.write_table(pa.table({"text": texts}), tmp_path / "a.parquet", row_group_size=400)
    Location.parse(f"{s3_bucket}/in/a.parquet").write_bytes((tmp_path / "a.parquet").read_bytes())
    flags = ["--on-bad-row", "skip", "--chunk-size", "300", "-q"]
    assert main([str(tiny_bert_bundle), str(tmp_path / "a.parquet"),
                 str(tmp_path / "local.parquet"), *flags]) == 0
    out = f"{s3_bucket}/out/ray"
    with deadline(180):
        assert main([str(tiny_bert_bundle), f"{s3_bucket}/in", out, *flags, "--ray",
                     "--ray-actors", "2"]) == 0
    want_ids, want_vecs, _ = read_output(tmp_path / "local.parquet")
    ids, vecs, meta = read_remote(out)
    order = np.argsort(ids)
    assert [ids[i] for i in order] == want_ids
    # other batches than the local job's, the same vectors to the last bit
    np.testing.assert_array_equal(vecs[order], want_vecs)
    assert meta["skipped"] == 1
    skipped = Location.parse(out + ".skipped.jsonl").read_bytes().decode().splitlines()
    assert [json.loads(x)["id"] for x in skipped] == [7]
    assert not Location.parse(out + ".partial").exists()
    assert main([str(tiny_bert_bundle), f"{s3_bucket}/in", out, *flags, "--ray"]) == 0


def _local_and_ray(bundle, tmp_path, src, name, *flags):
    """The local job and `--ray` on `src`: the same ids (with their types) and vectors."""
    from angle_rt.embed.cli import main

    local = tmp_path / f"{name}-local"
    assert main([str(bundle), str(src), str(local), *flags, "-q"]) == 0
    with deadline(180):
        assert main([str(bundle), str(src), str(tmp_path / name), *flags, "--ray",
                     "--ray-actors", "1", "-q"]) == 0
    (lid, lvec, _), (rid, rvec, meta) = read_output(local), read_output(tmp_path / name)
    order = sorted(range(len(rid)), key=lambda k: lid.index(rid[k]))
    assert [rid[k] for k in order] == lid  # the same ids, with their types
    np.testing.assert_array_equal(rvec[order], lvec)
    return lid, meta


def test_ray_takes_array_and_bool_ids_and_a_textless_first_record(local_ray,
                                                                  tiny_bert_bundle, tmp_path):
    """`--ray` refused array ids ("JSONL ids are list[int] values") and boolean ids, which
    the local job writes; a JSONL whose first record had no text was refused by both even
    with --on-bad-row skip. Now the same rows, ids and vectors as the local job."""
    rows = [{"id": [0], "body": "no text: a bad row"}, {"id": [1, 2], "text": "one"},
            {"id": [3, None], "text": "two"}, {"id": ["a"], "text": "strings: bad"},
            {"id": [], "text": "empty: bad"}, {"id": [7], "text": "last"}]
    src = tmp_path / "arrays.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ids, meta = _local_and_ray(tiny_bert_bundle, tmp_path, src, "arrays", "--id-column", "id",
                               "--on-bad-row", "skip")
    assert ids == [[1, 2], [3, None], [7]] and meta["skipped"] == 3
    src.write_text("".join(json.dumps({"id": b, "text": t}) + "\n"
                           for b, t in ((True, "yes"), (False, "no"))))
    assert _local_and_ray(tiny_bert_bundle, tmp_path, src, "bools", "--id-column",
                          "id")[0] == [True, False]


def test_ray_reads_jsonl_and_csv_as_the_local_job(local_ray, tiny_bert_bundle, tmp_path):
    """What `--ray` read through Ray's own readers, against the local job on the same files:
    JSONL string ids "007" / "1e3" came out as floats 7.0 / 1000.0, numeric-looking texts
    were dropped, a null id was written, a malformed line failed the job even with
    --on-bad-row skip; a CSV over 1 MB with newlines inside quoted values failed, and one
    byte that is not UTF-8 failed the whole file; a job with no rows wrote no Parquet file;
    an int8 rerun with another --chunk-size was "complete already" with the old ranges."""
    from angle_rt.embed.cli import main

    def both(src, name, *flags):
        return _local_and_ray(tiny_bert_bundle, tmp_path, src, name, *flags)

    rows = [{"id": {"a": 1}, "text": "an object id first: a bad row, not the id type"},
            {"id": "007", "text": "12345"}, {"id": "1e3", "text": "2024"},
            {"id": "x", "text": "a sentence"}, {"id": None, "text": "no id"},
            {"id": 5, "text": "an int id among strings"}]
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"id": "cut", "te\n')
    ids, meta = both(jsonl, "jsonl", "--id-column", "id", "--on-bad-row", "skip")
    assert ids == ["007", "1e3", "x"] and meta["skipped"] == 4
    listed = sorted(json.loads(x)["reason"][:12] for x in
                    (tmp_path / "jsonl.skipped.jsonl").read_text().splitlines())
    assert listed == ["id is a JSON", "id is int, b", "not valid JS", "null id"]
    big = tmp_path / "big.csv"  # past pyarrow's 1 MB block, newlines inside quoted values
    big.write_bytes(b"id,text\n" + b"".join(b'r%d,"line one of %d\nline two, %s"\n'
                                            % (i, i, b"x" * 40) for i in range(16000))
                    + b"bad,caf\xe9\n")
    ids, meta = both(big, "csv", "--id-column", "id", "--on-bad-row", "skip")
    assert len(ids) == 16000 and meta["skipped"] == 1
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = tmp_path / "parts"  # one file's texts dictionary-encoded, the other's plain
    parts.mkdir()
    texts = pa.array([f"sentence {i}" for i in range(40)])
    pq.write_table(pa.table({"id": list(range(20)), "text": texts[:20].dictionary_encode()}),
                   parts / "a.parquet")
    pq.write_table(pa.table({"id": list(range(20, 40)), "text": texts[20:]}),
                   parts / "b.parquet")
    assert both(parts, "pq", "--id-column", "id")[0] == list(range(40))
    empty = tmp_path / "empty.csv"
    empty.write_text("id,text\n")
    assert both(empty, "empty", "--id-column", "id")[0] == []
    flags = ["--id-column", "id", "--output-dtype", "int8", "--on-bad-row", "skip", "--ray",
             "-q"]
    with deadline(180):
        assert main([str(tiny_bert_bundle), str(big), str(tmp_path / "i8"), *flags,
                     "--chunk-size", "100"]) == 0
    assert main([str(tiny_bert_bundle), str(big), str(tmp_path / "i8"), *flags,
                 "--chunk-size", "400"]) == 2  # calibrated on another first chunk
    assert main([str(tiny_bert_bundle), str(big), str(tmp_path / "o.parquet"), *flags]) == 1
