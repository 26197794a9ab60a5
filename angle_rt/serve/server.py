"""Running the server: open the bundles, bind, serve with uvicorn until SIGTERM / SIGINT,
then drain — stop admitting, finish what is queued, exit 0."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.util
import logging
import logging.handlers
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

import orjson
import uvicorn

from angle_rt._system import physical_cores
from angle_rt.encoder import Encoder
from angle_rt.serve.app import ServerState, build_app
from angle_rt.serve.config import ServeConfig
from angle_rt.serve.metrics import Metrics
from angle_rt.serve.models import ServedModel

log = logging.getLogger("angle_rt.serve")
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
FLUSH_S = 0.02  # the log writer writes what gathered at most this often
FORCED_ANSWER_S = 1.0  # after a forced exit, how long the aborted requests get to answer


def serve(config: ServeConfig) -> int:
    """Serve until a signal; 0 after a drained shutdown. Raises AngleRTError / OSError when
    a bundle cannot be opened or the address cannot be bound."""
    setup_logging(config)
    metrics = Metrics()
    state = ServerState(open_models(config, metrics), config, metrics)
    try:
        sock = bind(config.host, config.port)
    except OSError:
        for model in state.models.values():
            model.close()
        raise
    host, port = sock.getsockname()[:2]
    uv_config = uvicorn.Config(
        build_app(state), lifespan="on", log_config=None, access_log=False,
        loop="uvloop" if _have("uvloop") else "asyncio",
        http=_http(config),
        timeout_graceful_shutdown=config.graceful_timeout, server_header=False,
        backlog=2048)
    server = DrainingServer(uv_config, state)
    log.info("listening", extra={"fields": {"url": f"http://{_netloc(host, port)}",
                                            "models": list(state.models)}})
    server.run(sockets=[sock])
    clean = server.started and not state.aborted
    log.info("stopped", extra={"fields": {"clean": clean, "aborted": state.aborted}})
    return 0 if clean else 1


# idle intra-op threads sleep: between batches the cores go to the event loop and tokenizing
NO_SPIN = {"session.intra_op.allow_spinning": "0"}


def open_models(config: ServeConfig, metrics: Metrics) -> dict[str, ServedModel]:
    """An Encoder and a batcher per bundle (each closed again if a later one fails)."""
    models: dict[str, ServedModel] = {}
    try:
        for spec in config.models:
            start = time.perf_counter()
            enc = Encoder(spec.path, precision=config.precision, backend=config.backend,
                          intra_op_threads=cpu_threads(config),
                          max_batch_tokens=config.max_batch_tokens,
                          layers=spec.layers or config.layers,
                          ort_config=None if config.spin else NO_SPIN)
            model = ServedModel(spec.name, enc, config, metrics.on_batch(spec.name))
            metrics.watch(spec.name, model.batcher)
            models[spec.name] = model
            log.info("loaded", extra={"fields": {
                "model": spec.name, "bundle": str(enc.bundle), "artifact": enc.artifact.file,
                "backend": enc.session.name, "dim": enc.dim, "max_length": enc.max_length,
                "layers": enc.artifact.layers,
                "workers": model.workers, "seconds": round(time.perf_counter() - start, 2)}})
    except BaseException:
        for model in models.values():
            model.close()
        raise
    return models


def cpu_threads(config: ServeConfig) -> int | None:
    """ONNX Runtime threads a batch: --threads; with --spin the cores but one, which stays
    with the event loop and tokenization (spin-waiting threads compete with it for every
    core: on 2 cores, 2 spinning threads served half of what 1 did); with --workers N, the
    cores shared among them; else None: the Encoder's CPU default, one worker a physical
    core on one thread each (they serve more than one worker on every core at 8 clients
    and more, and answer a lone short text as fast: docs/serving.md)."""
    if config.threads:
        return config.threads
    if config.spin:
        return max(1, physical_cores() - 1)
    if config.workers:
        return max(1, physical_cores() // config.workers)
    return None


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with /ready turning 503 at the first signal, and no re-raise of the
    signal after the graceful shutdown (so a drained server exits 0)."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.state.draining:
            log.info("draining", extra={"fields": {"signal": signal.Signals(sig).name,
                                                   "in_flight": self.state.in_flight}})
            # just before uvicorn cancels what is left (a plain-text 500), answer it in JSON
            grace = self.state.config.graceful_timeout
            timer = threading.Timer(max(0.0, grace - min(0.5, grace / 4)),
                                    self.state.abort_in_flight)
            timer.daemon = True
            timer.start()
        self.state.drain()
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        if self.force_exit and self.server_state.tasks:
            # a second Ctrl-C: what is left answers a JSON 503 now (uvicorn would cancel
            # it into a plain-text 500) and the exit is not clean
            self.state.abort_in_flight()
            deadline = time.monotonic() + FORCED_ANSWER_S
            while self.server_state.tasks and time.monotonic() < deadline:
                await asyncio.sleep(0.01)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and the record's `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
               + f".{int(record.msecs):03d}Z", "level": record.levelname.lower(),
               "logger": record.name, "msg": record.getMessage(),
               **getattr(record, "fields", {})}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        return super().format(record) + (" " + extra if extra else "")


class LogWriter(logging.handlers.QueueHandler):
    """Log records go onto a queue; a thread formats them and writes the lines gathered in
    one write and flush, at most every FLUSH_S. The event loop pays a queue put per
    access-log line, not the formatting, a write + flush syscall or a thread wake-up
    (measured: docs/serving.md). Lines are written in order; `close` (also at exit) writes
    what is queued."""

    def __init__(self, stream: Any, formatter: logging.Formatter) -> None:
        super().__init__(queue.SimpleQueue())
        self.stream, self.lines = stream, formatter
        self._thread = threading.Thread(target=self._write, name="log-writer", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record  # formatted by the writer thread

    def _write(self) -> None:
        while True:
            pending = [self.queue.get()]
            with contextlib.suppress(queue.Empty):
                while True:
                    pending.append(self.queue.get_nowait())
            stop = any(record is None for record in pending)  # close() queued None last
            out = []
            for record in pending:
                if record is None:
                    continue
                try:
                    out.append(self.lines.format(record))
                except Exception:
                    self.handleError(record)
            if out:
                with contextlib.suppress(OSError, ValueError):  # a closed stream at exit
                    self.stream.write("\n".join(out) + "\n")
                    self.stream.flush()
            if stop:
                return
            # let lines gather: a record put while this thread sleeps wakes nothing, where a
            # blocked get() cost the event loop a thread wake-up per access-log line
            time.sleep(FLUSH_S)

    def close(self) -> None:
        if self._thread.is_alive():
            self.queue.put_nowait(None)
            self._thread.join(5)
        super().close()


def setup_logging(config: ServeConfig) -> None:
    formatter = JsonFormatter() if config.log_format == "json" else TextFormatter()
    root = logging.getLogger()
    for old in root.handlers:
        old.close()
    root.handlers[:] = [LogWriter(sys.stderr, formatter)]
    root.setLevel(config.log_level.upper())
    logging.captureWarnings(True)


def _http(config: ServeConfig) -> type | str:
    """httptools with a deadline and a cap on request heads (angle_rt.serve.wire), else h11
    (which caps a head at 16 KB but times out none)."""
    if not _have("httptools"):
        return "h11"
    from angle_rt.serve.wire import guarded

    return guarded(config.body_timeout)


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
