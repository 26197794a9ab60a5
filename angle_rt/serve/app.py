"""The ASGI application: Starlette routes for the OpenAI and TEI endpoints, behind a small
ASGI front door (request id, API key, payload limit, metrics, access log)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from angle_rt.errors import ClosedError
from angle_rt.serve.batcher import Overloaded, Ticket
from angle_rt.serve.config import ServeConfig
from angle_rt.serve.metrics import Metrics
from angle_rt.serve.models import ServedModel
from angle_rt.serve.protocol import (
    ApiError,
    EmbedRequest,
    dumps,
    openai_body,
    parse_json,
    parse_openai,
    parse_tei_embed,
    parse_tokenize,
)

JSON = "application/json"
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})
TEI_PATHS = frozenset({"/embed", "/tokenize"})  # errors in TEI's {"error", "error_type"}
ROUTES = frozenset({"/v1/embeddings", "/embeddings", "/v1/models", "/models", "/embed",
                    "/tokenize", "/info", "/health", "/ready", "/metrics"})
# bodies up to this size are parsed and tokenized on the event loop (measured: a thread hop
# each way cost more than the work for one-sentence requests; docs/serving.md)
INLINE_BYTES = 4096
BODY_BYTES = "angle_rt.body_bytes"
HEALTH_FRESH_S = 10.0  # a batch that succeeded this recently vouches for the model
HEALTH_PROBE_S = 5.0
CLIENT_GONE = 499  # nginx's code for a client that closed before its answer
PROBE = EmbedRequest(["angle-rt health probe"], None, "input")
ABORTED = ("the server shut down (--graceful-timeout) before this request finished; retry "
           "on another replica")
_TIMEOUT = getattr(asyncio, "timeout", None)  # Python 3.11+
T = TypeVar("T")
access_log = logging.getLogger("angle_rt.serve.access")
log = logging.getLogger("angle_rt.serve")


class ClientGone(Exception):
    """The client disconnected before its vectors were ready."""


@dataclass
class ServerState:
    """What the routes share: the models, settings, metrics and lifecycle flags."""

    models: dict[str, ServedModel]
    config: ServeConfig
    metrics: Metrics
    ready: bool = False
    draining: bool = False
    warmup_error: str | None = None
    in_flight: int = 0
    tokenizer_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(2, thread_name_prefix="tokenize"))

    def set_ready(self, ready: bool) -> None:
        self.ready = ready
        self.metrics.ready.set(1 if ready and not self.draining else 0)

    aborted: int = 0  # requests failed when the graceful timeout ran out
    aborting: bool = False  # the graceful timeout ran out: what uvicorn cancels answers 503

    def drain(self) -> None:
        """Shutdown began: /ready answers 503 from now on."""
        self.draining = True
        self.set_ready(self.ready)

    def abort_in_flight(self) -> None:
        """The grace period is over: every unfinished request answers a JSON 503 now,
        before the server closes its connections."""
        self.aborting = True
        err = ClosedError(ABORTED)
        for model in self.models.values():
            self.aborted += model.batcher.abort(err)
        if self.aborted:
            log.warning("graceful timeout: requests aborted",
                        extra={"fields": {"aborted": self.aborted}})

    def model(self, name: str | None) -> ServedModel:
        if name is None:
            return next(iter(self.models.values()))
        try:
            return self.models[name]
        except KeyError:
            served = ", ".join(self.models)
            raise ApiError(404, f"The model {name!r} does not exist; this server serves: "
                                f"{served}", param="model", code="model_not_found") from None


@dataclass
class Timing:
    """One request's trip, for the timing headers and the access log."""

    start: float = field(default_factory=time.perf_counter)
    tokenization_s: float = 0.0
    ticket: Ticket | None = None
    tokens: int = 0
    characters: int = 0

    def headers(self, compute_type: str) -> dict[str, str]:
        t = self.ticket
        total = time.perf_counter() - self.start
        return {"x-compute-type": compute_type,
                "x-compute-tokens": str(self.tokens),
                "x-compute-characters": str(self.characters),
                "x-total-time": _ms(total),
                "x-tokenization-time": _ms(self.tokenization_s),
                "x-queue-time": _ms(t.queue_s if t else 0.0),
                "x-inference-time": _ms(t.inference_s if t else 0.0)}


class Api:
    """The endpoints."""

    def __init__(self, state: ServerState) -> None:
        self.state, self.cfg = state, state.config

    # -- embeddings ------------------------------------------------------------------------

    async def openai_embeddings(self, request: Request) -> Response:
        body = await self._json(request)  # before admission: a slow upload holds no slot
        with self._admitted():
            req = await self._cpu(request, parse_openai, body,
                                  self.cfg.max_client_batch_size)
            model = self.state.model(req.model)
            model.check_dimensions(req.dimensions)
            # OpenAI's clients decode base64 as float32 and take dot products as cosines:
            # float32 unit vectors unless the request itself names another dtype (which the
            # x-output-dtype header then states); the server's --output-dtype is TEI's
            dtype = model.check_output_dtype(req.output_dtype or "float32", req.dimensions)
            vecs, timing = await self._embed(request, model, req, self.cfg.truncate)
            body = openai_body(model.finish(vecs, req.dimensions, True, dtype),
                               model.name, req.encoding_format, timing.tokens)
            headers = timing.headers(model.encoder.artifact.precision)
            return _response(body, {**headers, "x-output-dtype": dtype})

    async def tei_embed(self, request: Request) -> Response:
        body = await self._json(request)
        with self._admitted():
            req = await self._cpu(request, parse_tei_embed, body,
                                  self.cfg.max_client_batch_size)
            model = self.state.model(req.model)
            model.check_dimensions(req.dimensions)
            dtype = model.check_output_dtype(req.output_dtype, req.dimensions)
            truncate = self.cfg.truncate if req.truncate is None else req.truncate
            vecs, timing = await self._embed(request, model, req, truncate)
            normalize = True if req.normalize is None else req.normalize
            body = dumps(model.finish(vecs, req.dimensions, normalize, dtype))
            return _response(body, timing.headers(model.encoder.artifact.precision))

    async def tokenize(self, request: Request) -> Response:
        body = await self._json(request)
        with self._admitted():
            req = await self._cpu(request, parse_tokenize, body,
                                  self.cfg.max_client_batch_size)
            model = self.state.model(req.model)
            truncate = False if req.truncate is None else req.truncate  # TEI: every token
            try:
                tokens = await self._cpu(request, model.tokens, req, truncate)
            except ApiError as exc:
                if exc.status == 413:
                    self.state.metrics.rejections.labels("request_tokens").inc()
                raise
            return _response(dumps(tokens))

    async def _embed(self, request: Request, model: ServedModel, req: EmbedRequest,
                     truncate: bool) -> tuple[np.ndarray, Timing]:
        timing = Timing(characters=sum(map(len, req.texts)) if req.texts else 0)
        deadline = timing.start + self.cfg.request_timeout
        rows = await self._cpu(request, model.rows, req, truncate,
                               timeout=self.cfg.request_timeout)
        timing.tokenization_s = time.perf_counter() - timing.start
        timing.tokens = sum(map(len, rows))
        metrics = self.state.metrics
        series = metrics.model(model.name)
        series.tokenization.observe(timing.tokenization_s)
        if timing.tokens > self.cfg.max_request_tokens:
            metrics.rejections.labels("request_tokens").inc()
            raise ApiError(413, f"The request holds {timing.tokens} tokens; this server's "
                                f"limit is {self.cfg.max_request_tokens} a request "
                                "(--max-request-tokens): split it", code="too_many_tokens")
        try:
            ticket = timing.ticket = model.batcher.submit(rows)
        except Overloaded as exc:
            metrics.rejections.labels("queued_tokens").inc()
            raise ApiError(429, f"Server overloaded: {exc}; retry later",
                           code="rate_limit_exceeded",
                           headers={"retry-after": str(exc.retry_after)}) from None
        except ClosedError as exc:
            raise ApiError(503, str(exc), code="shutting_down") from None
        vecs = await self._wait(request, ticket, deadline)
        series.queue.observe(ticket.queue_s)
        series.inputs.inc(len(rows))
        series.tokens.inc(timing.tokens)
        request.scope["angle_rt"] = {"model": model.name, "inputs": len(rows),
                                     "tokens": timing.tokens}
        return vecs, timing

    async def _wait(self, request: Request, ticket: Ticket, deadline: float) -> np.ndarray:
        """The ticket's vectors; if the client disconnects or the deadline passes first,
        its queued inputs are dropped (the ticket is cancelled): ClientGone, or 504."""
        future = ticket.future
        gone = await _settle(future, request.receive, deadline - time.perf_counter())
        if future.cancelled():
            if gone:
                raise ClientGone
            raise self._timed_out()
        try:
            return future.result()
        except ClosedError as exc:
            raise ApiError(503, str(exc), code="shutting_down") from None
        except Exception as exc:
            # logged with its traceback here; the client gets no internals
            log.exception("batch failed")
            raise ApiError(500, f"inference failed ({type(exc).__name__}); the server "
                                "logged the cause", code="inference_failed") from None

    def _timed_out(self) -> ApiError:
        self.state.metrics.rejections.labels("request_timeout").inc()
        return ApiError(504, f"The request did not finish within {self.cfg.request_timeout:g}"
                             " s (--request-timeout); its inputs were dropped", code="timeout")

    async def _cpu(self, request: Request, fn: Any, *args: Any,
                   timeout: float | None = None) -> Any:
        """`fn(*args)` for this request: on the event loop for a small body (a few sentences
        parse and tokenize in tens of µs, less than a thread hop costs), else on the
        tokenizer pool so a large one cannot stall other requests; there, maybe behind
        other large ones, within `timeout` (504; the pool drops it if not started)."""
        if request.scope.get(BODY_BYTES, INLINE_BYTES + 1) <= INLINE_BYTES:
            return fn(*args)
        if timeout is None:
            return await self._off_loop(fn, *args)
        try:
            return await _within(timeout, self._off_loop(fn, *args))
        except asyncio.TimeoutError:
            raise self._timed_out() from None

    async def _off_loop(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.state.tokenizer_pool, fn, *args)

    async def _json(self, request: Request) -> Any:
        """The parsed body: 415 unless it is sent as JSON, 413 past --payload-limit, 408 if
        it takes longer than --body-timeout to arrive."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != JSON:
            raise ApiError(415, f"Send the body as {JSON} (Content-Type was "
                                f"{kind or 'missing'!r})", code="unsupported_media_type")
        try:
            body = await _within(self.cfg.body_timeout,
                                 _read_body(request.receive, self.cfg.payload_limit))
        except asyncio.TimeoutError:
            self.state.metrics.rejections.labels("body_timeout").inc()
            raise ApiError(408, f"The request body did not arrive within "
                                f"{self.cfg.body_timeout:g} s (--body-timeout)",
                           code="request_timeout", headers={"connection": "close"}) from None
        request.scope[BODY_BYTES] = len(body)
        return parse_json(body)

    @contextmanager
    def _admitted(self) -> Iterator[None]:
        state = self.state
        if state.in_flight >= self.cfg.max_concurrent_requests:
            state.metrics.rejections.labels("concurrent_requests").inc()
            raise ApiError(429, f"Server overloaded: {state.in_flight} requests in flight "
                                f"(limit {self.cfg.max_concurrent_requests}); retry later",
                           code="rate_limit_exceeded", headers={"retry-after": "1"})
        state.in_flight += 1
        state.metrics.in_flight.inc()
        try:
            yield
        finally:
            state.in_flight -= 1
            state.metrics.in_flight.dec()

    # -- everything else -----------------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        cards = [m.card() for m in self.state.models.values()]
        return _response(dumps({"object": "list", "data": cards}))

    async def info(self, request: Request) -> Response:
        model = self.state.model(request.query_params.get("model"))
        return _response(dumps({**model.info(), "models": list(self.state.models)}))

    async def health(self, request: Request) -> Response:
        """200 while every model can embed; 503 naming each model that cannot: a worker
        stuck in one batch past --request-timeout, or (when idle and nothing succeeded in
        the last HEALTH_FRESH_S) a probe through the real path that fails or times out."""
        problems = {}
        for model in self.state.models.values():
            why = await self.model_problem(model)
            if why is not None:
                problems[model.name] = why
        if problems:
            return _response(dumps({"status": "unhealthy", "models": problems}), status=503)
        return _response(b'{"status":"ok"}')

    async def model_problem(self, model: ServedModel) -> str | None:
        """Why `model` cannot embed now (None: it can); /health and Ray Serve's
        check_health ask it."""
        b = model.batcher
        if b.closed:
            return "shutting down"
        if b.live_workers() < model.workers:
            return f"{model.workers - b.live_workers()} of {model.workers} workers are dead"
        stuck = b.stalled_s()
        if stuck > self.cfg.request_timeout:
            return f"a batch has been running for {stuck:.0f} s"
        fresh = b.last_ok is not None and time.perf_counter() - b.last_ok < HEALTH_FRESH_S
        if fresh or not b.idle:  # recent success, or busy and not stuck: alive
            return None
        try:
            rows = await self._off_loop(model.rows, PROBE, True)
            await asyncio.wait_for(asyncio.wrap_future(b.submit(rows).future), HEALTH_PROBE_S)
        except asyncio.TimeoutError:
            return f"a probe did not finish within {HEALTH_PROBE_S:g} s"
        except Exception as exc:
            log.exception("health probe failed")
            return f"a probe failed ({type(exc).__name__})"
        return None

    async def ready(self, request: Request) -> Response:
        s = self.state
        if s.ready and not s.draining:
            return _response(b'{"status":"ready"}')
        why = ("draining" if s.draining else "warm-up failed: " + s.warmup_error
               if s.warmup_error else "warming up")
        return _response(dumps({"status": why}), status=503)

    async def metrics(self, request: Request) -> Response:
        body, content_type = self.state.metrics.render()
        return Response(body, media_type=content_type)

    async def warm_up(self) -> None:
        """One batch per model through the real path; then /ready answers 200."""
        try:
            for model in self.state.models.values():
                req = EmbedRequest(["angle-rt warm-up"], None, "input")
                rows = await self._off_loop(model.rows, req, True)
                await asyncio.wrap_future(model.batcher.submit(rows).future)
        except Exception as exc:
            self.state.warmup_error = f"{type(exc).__name__}: {exc}"
            log.exception("warm-up failed; /ready stays 503")
            return
        self.state.set_ready(True)
        log.info("ready", extra={"fields": {"models": list(self.state.models)}})


def build_app(state: ServerState) -> ASGIApp:
    """The ASGI app serving `state`'s models."""
    api = Api(state)
    post, get = ["POST"], ["GET"]
    routes = [
        Route("/v1/embeddings", api.openai_embeddings, methods=post),
        Route("/embeddings", api.openai_embeddings, methods=post),
        Route("/v1/models", api.list_models, methods=get),
        Route("/models", api.list_models, methods=get),
        Route("/embed", api.tei_embed, methods=post),
        Route("/tokenize", api.tokenize, methods=post),
        Route("/info", api.info, methods=get),
        Route("/health", api.health, methods=get),
        Route("/ready", api.ready, methods=get),
        Route("/metrics", api.metrics, methods=get),
    ]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        warm = asyncio.create_task(api.warm_up())
        try:
            yield
        finally:
            state.drain()
            warm.cancel()
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, _close_models, state)

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={ApiError: _api_error, HTTPException: _http_error,
                                        ClientGone: _client_gone, Exception: _server_error})
    direct = {"/v1/embeddings": api.openai_embeddings, "/embeddings": api.openai_embeddings,
              "/embed": api.tei_embed}
    return FrontDoor(app, state, direct)


Handler = Callable[[Request], Awaitable[Response]]


class FrontDoor:
    """Pure ASGI middleware: request id, API key, payload limit (Content-Length), metrics
    per route and code, one structured access-log line per request. The embedding routes'
    POSTs (`direct`) go straight to their handler: Starlette's router, request and
    exception layers cost a served one-sentence request more than its parse and tokenize
    (docs/serving.md); every other request goes through `app`."""

    def __init__(self, app: ASGIApp, state: ServerState,
                 direct: dict[str, Handler] | None = None) -> None:
        self.app, self.state, self.direct = app, state, direct or {}
        key = state.config.api_key
        self._key = key.encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status, started = time.perf_counter(), 500, False
        headers = dict(scope["headers"])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or _request_id()
        path, echo_id = scope["path"], self.state.config.request_id_header

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                if echo_id:
                    message["headers"] = [*message.get("headers", ()),
                                          (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        try:
            problem = self._gate(path, headers)
            handler = self.direct.get(path) if scope["method"] == "POST" else None
            if problem is not None:
                await _send_error(send_with_id, problem, path)
            elif handler is not None:
                await _serve(handler, scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            # uvicorn cancels what is left at --graceful-timeout (a request still reading its
            # body or tokenizing): answer in JSON like the ones abort_in_flight failed
            if not self.state.aborting or started:
                if not started:  # the client went away (Ray cancels the replica's task)
                    status = CLIENT_GONE
                raise
            await _send_error(send_with_id, ApiError(503, ABORTED, code="shutting_down"), path)
        finally:
            self._record(scope, path, status, time.perf_counter() - start, rid)

    def _gate(self, path: str, headers: dict[bytes, bytes]) -> ApiError | None:
        if self._key is not None and path not in OPEN_PATHS:
            given = headers.get(b"authorization")
            if given is None:
                return ApiError(401, "Missing API key: send `Authorization: Bearer KEY`",
                                code="invalid_api_key",
                                headers={"www-authenticate": "Bearer"})
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._key):
                return ApiError(401, "Incorrect API key provided", code="invalid_api_key",
                                headers={"www-authenticate": "Bearer"})
        length = headers.get(b"content-length")
        limit = self.state.config.payload_limit
        if length is not None and length.isdigit() and int(length) > limit:
            return _too_large(limit)
        return None

    def _record(self, scope: Scope, path: str, status: int, seconds: float, rid: str) -> None:
        route = path if path in ROUTES else "other"
        count, duration = self.state.metrics.request(route, status)
        count.inc()
        duration.observe(seconds)
        if self.state.config.access_log:
            client = scope.get("client")
            fields = {"method": scope["method"], "path": path, "status": status,
                      "ms": round(seconds * 1000, 2), "request_id": rid,
                      "client": f"{client[0]}:{client[1]}" if client else None,
                      **scope.get("angle_rt", {})}
            access_log.info("request", extra={"fields": fields})


async def _serve(handler: Handler, scope: Scope, receive: Receive, send: Send) -> None:
    """`handler`'s response, with the app's exception handlers' answers."""
    request = Request(scope, receive)
    try:
        response = await handler(request)
    except ApiError as exc:
        response = await _api_error(request, exc)
    except ClientGone as exc:
        response = await _client_gone(request, exc)
    except Exception as exc:
        response = await _server_error(request, exc)
    await response(scope, receive, send)


def _close_models(state: ServerState) -> None:
    for model in state.models.values():
        model.close(timeout=state.config.graceful_timeout)
    state.tokenizer_pool.shutdown(wait=False)


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _settle(future: Future, receive: Receive, timeout: float) -> bool:
    """Wait until the worker's `future` is done, the client disconnects or `timeout`
    passes; then cancel `future` unless it is done (its queued inputs are dropped). True
    if the client disconnected. (One loop future woken by all three: asyncio.wait plus
    wrap_future cost twice the objects and callbacks, on every request.)"""
    loop = asyncio.get_running_loop()
    woke = loop.create_future()

    def wake(_: object = None) -> None:
        if not woke.done():
            woke.set_result(None)

    def wake_from_worker(_: Future) -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(wake)

    future.add_done_callback(wake_from_worker)
    watch = loop.create_task(_disconnect(receive))
    watch.add_done_callback(wake)
    timer = loop.call_later(max(0.0, timeout), wake)
    try:
        await woke
    finally:
        timer.cancel()
        gone = watch.done() and not watch.cancelled()
        if gone:
            watch.exception()  # a receive that failed counts as a disconnect; retrieved
        watch.cancel()
        future.cancel()  # no-op once done
    return gone


async def _read_body(receive: Receive, limit: int) -> bytes:
    """The whole body; 413 as soon as it passes `limit` bytes, ClientGone on disconnect."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _within(seconds: float, work: Awaitable[T]) -> T:
    """`await work`, TimeoutError past `seconds` (asyncio.timeout where Python has it:
    wait_for wraps the work in a task of its own)."""
    if _TIMEOUT is None:
        return await asyncio.wait_for(work, seconds)
    async with _TIMEOUT(seconds):
        return await work


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"The request body is larger than this server's limit of {limit} "
                         "bytes (--payload-limit)", code="payload_too_large")


def _response(body: bytes, headers: dict[str, str] | None = None,
              status: int = 200) -> Response:
    return Response(body, status_code=status, headers=headers, media_type=JSON)


def _error_response(err: ApiError, path: str = "") -> Response:
    return Response(err.body(tei=path in TEI_PATHS), status_code=err.status,
                    headers=err.headers, media_type=JSON)


async def _send_error(send: Send, err: ApiError, path: str = "") -> None:
    headers = [(b"content-type", JSON.encode())]
    headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in err.headers.items()]
    body = err.body(tei=path in TEI_PATHS)
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _error_response(exc, request.url.path)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = (f"No route {request.method} {request.url.path}" if exc.status_code == 404
               else f"{request.method} is not allowed on {request.url.path}"
               if exc.status_code == 405 else str(exc.detail))
    return _error_response(ApiError(exc.status_code, message, code=code,
                                    headers=exc.headers), request.url.path)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error")
    return _error_response(ApiError(500, "internal error; the server logged the cause",
                                    code="internal_error"), request.url.path)


async def _client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=CLIENT_GONE)


def _request_id() -> str:
    """A random 128-bit id (uuid4's os.urandom is a system call a request; the random
    module, seeded from it and re-seeded in forked children, is not)."""
    return f"{random.getrandbits(128):032x}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"
