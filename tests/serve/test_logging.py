"""The server's log writer: records queued by the event loop, formatted and written in order
by a thread, every pending line in one write; nothing lost at close."""

from __future__ import annotations

import io
import json
import logging
import threading

from angle_rt.serve.server import JsonFormatter, LogWriter


class Gated(io.StringIO):
    """Counts writes; the first one waits for `gate` (a slow disk, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.gate = threading.Event()

    def write(self, s: str) -> int:
        self.writes += 1
        assert self.gate.wait(10)
        return super().write(s)


def test_lines_in_order_batched_and_flushed_at_close():
    stream = Gated()
    writer = LogWriter(stream, JsonFormatter())
    logger = logging.Logger("t")  # not the root: the test's own handler only
    logger.addHandler(writer)
    for i in range(2000):  # the caller never waits for the stream
        logger.info("request", extra={"fields": {"i": i, "path": "/embed"}})
    stream.gate.set()
    writer.close()
    lines = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert [x["i"] for x in lines] == list(range(2000))
    assert lines[0]["msg"] == "request" and lines[0]["level"] == "info"
    assert stream.writes <= 3  # what queued while a write was slow goes out in one


def test_a_line_that_cannot_be_formatted_costs_only_itself(capsys):
    class Picky(JsonFormatter):
        def format(self, record: logging.LogRecord) -> str:
            if getattr(record, "fields", {}).get("bad"):
                raise ValueError("cannot format")
            return super().format(record)

    stream = Gated()
    stream.gate.set()
    writer = LogWriter(stream, Picky())
    logger = logging.Logger("t")
    logger.addHandler(writer)
    logger.info("a", extra={"fields": {"n": 1}})
    logger.info("b", extra={"fields": {"bad": True}})
    logger.info("c", extra={"fields": {"n": 3}})
    writer.close()
    assert [json.loads(x)["msg"] for x in stream.getvalue().splitlines()] == ["a", "c"]
    assert "cannot format" in capsys.readouterr().err  # logging's handleError reports it
