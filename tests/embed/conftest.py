"""Fixtures of the file job and Ray tests: real sentences written in every input format."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# A Ray started by these tests listens on the loopback interface only (read when ray is
# imported; angle_rt.ray.init_ray sets it too).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def sentences(stsb_test) -> list[str]:
    """STS-B test: 2,758 real sentences (duplicates kept)."""
    return stsb_test.sentences


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory, sentences) -> Path:
    """The sentences as .parquet (3 row groups), .jsonl, .csv and .txt, with string ids
    'doc-<n>' in an `id` column (none in .txt), and as a directory of two Parquet files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("corpus")
    ids = [f"doc-{i}" for i in range(len(sentences))]
    table = pa.table({"id": ids, "text": sentences, "score": list(range(len(sentences)))})
    pq.write_table(table, d / "corpus.parquet", row_group_size=1000)
    (d / "parts").mkdir()
    half = len(sentences) // 2
    pq.write_table(table.slice(0, half), d / "parts" / "a.parquet", row_group_size=700)
    pq.write_table(table.slice(half), d / "parts" / "b.parquet")
    with open(d / "corpus.jsonl", "w", encoding="utf-8") as fh:
        for i, t in zip(ids, sentences, strict=True):
            fh.write(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n")
    import csv

    with open(d / "corpus.csv", "w", encoding="utf-8", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["id", "text"])
        out.writerows(zip(ids, sentences, strict=True))
    (d / "corpus.txt").write_text("\n".join(sentences) + "\n", encoding="utf-8")
    return d


@pytest.fixture(scope="session")
def tiny_encoder(tiny_bert_bundle):
    from angle_rt import Encoder

    with Encoder(tiny_bert_bundle) as enc:
        yield enc


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """An S3-compatible server (moto's server mode) on 127.0.0.1 for the session, and the
    AWS_* environment pointing every S3 client (pyarrow.fs, Ray's workers) at it: no
    request can reach a real bucket."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env["AWS_ENDPOINT_URL"]
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request) -> str:
    """A new, empty bucket on the local S3 server: its s3:// URI."""
    import re

    import pyarrow.fs as pafs

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    name = f"{name}-{os.urandom(3).hex()}"
    pafs.S3FileSystem(endpoint_override=s3_server, allow_bucket_creation=True,
                      access_key="testing", secret_key="testing").create_dir(name)
    return f"s3://{name}"
