"""Dynamic batching across requests: one queue item per input, batches under a padded-token
budget, length-sorted within a window at the head of the queue, FIFO between windows.

No web framework and no torch here: the batcher runs plain callables (`Encoder.run_batch`
and `Encoder.plan` in the server, fakes in the tests) on its own worker threads, and hands
each request a `concurrent.futures.Future` (asyncio code awaits it via `asyncio.wrap_future`).

How a batch is formed (the worker that is free takes the next one):

1. Window: items are taken from the head of the queue, oldest first, until the window holds
   `window_batches × max_batch_size` items or `window_batches × max_batch_tokens` tokens
   (at least one item). Items of cancelled or failed requests are dropped on the way.
2. The window is planned by `plan(lengths, max_batch_size)` — the Encoder's own planner, so
   batches are length-sorted and padded exactly as `Encoder.encode` pads them — and its
   batches run before anything that arrived later: FIFO between windows, so a flood of long
   texts cannot starve a short one queued before it.
3. No artificial wait (`max_wait_ms=0`): a worker takes whatever is queued. With a wait, a
   worker holds off until a full batch is queued or the oldest item waited that long.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import numpy as np

from angle_rt.errors import AngleRTError, ClosedError

log = logging.getLogger("angle_rt.serve")

RunBatch = Callable[[Sequence[Sequence[int]]], np.ndarray]
Plan = Callable[[list[int], int], list[np.ndarray]]
#: on_batch(items, padded_tokens, seconds): called after each batch that ran
OnBatch = Callable[[int, int, float], None]


class Overloaded(AngleRTError, RuntimeError):
    """The queue holds too many tokens; retry after `retry_after` seconds (HTTP 429)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(eq=False)
class Ticket:
    """One request in the batcher. `future` resolves to its (n, dim) float32 vectors in input
    order, or to the exception of a batch it was in; cancelling it drops its queued items."""

    rows: Sequence[Sequence[int]]
    out: np.ndarray
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None  # the first of its batches began
    finished: float | None = None
    inference_s: float = 0.0  # time of the batches it was in, summed
    remaining: int = 0  # items without a vector yet
    pending_items: int = 0  # items not yet in a running batch
    pending_tokens: int = 0  # their tokens

    @property
    def queue_s(self) -> float:
        return (self.started or self.submitted) - self.submitted

    @property
    def tokens(self) -> int:
        return sum(len(r) for r in self.rows)


Item = tuple[Ticket, int]


class Batcher:
    """Batches the rows of concurrent requests and runs them on `workers` threads.

    `run_batch(rows) -> (len(rows), dim)` runs one batch (thread-safe when workers > 1);
    `plan(lengths, max_batch_size)` splits a window into index batches under the token
    budget. `max_queued_tokens` bounds the tokens waiting (None: unbounded); a request is
    refused with `Overloaded` when it would pass the bound, unless the queue is empty (so a
    client batch larger than the bound still runs, alone).
    """

    def __init__(
        self,
        run_batch: RunBatch,
        plan: Plan,
        dim: int,
        *,
        max_batch_size: int = 32,
        max_batch_tokens: int = 16384,
        workers: int = 1,
        max_wait_ms: float = 0.0,
        max_queued_tokens: int | None = None,
        window_batches: int = 16,
        on_batch: OnBatch | None = None,
        name: str = "batcher",
    ) -> None:
        if min(max_batch_size, max_batch_tokens, workers, window_batches) < 1:
            raise ValueError("max_batch_size, max_batch_tokens, workers and window_batches "
                             "must be ≥ 1")
        self._run_batch, self._plan, self.dim = run_batch, plan, dim
        self.max_batch_size, self.max_batch_tokens = max_batch_size, max_batch_tokens
        self.max_wait_s = max(0.0, max_wait_ms) / 1000
        self.max_queued_tokens = max_queued_tokens
        self._window_items = window_batches * max_batch_size
        self._window_tokens = window_batches * max_batch_tokens
        self._on_batch = on_batch
        self._cond = threading.Condition()
        self._queue: deque[Item] = deque()
        self._planned: deque[list[Item]] = deque()
        self._queued_items = self._queued_tokens = 0
        self._closing = False
        self._tokens_per_s = 0.0  # moving average, for Retry-After
        self.worker_restarts = 0  # batches that failed outside the model run (see _work)
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    # -- the request side -------------------------------------------------------------------

    def submit(self, rows: Sequence[Sequence[int]]) -> Ticket:
        """Queue one request's token rows; ClosedError once closing, Overloaded when full."""
        ticket = Ticket(rows, np.empty((len(rows), self.dim), dtype=np.float32))
        tokens = ticket.tokens
        ticket.remaining = ticket.pending_items = len(rows)
        ticket.pending_tokens = tokens
        if not rows:
            ticket.finished = ticket.submitted
            ticket.future.set_result(ticket.out)
            return ticket
        with self._cond:
            if self._closing:
                raise ClosedError("the server is shutting down; retry on another replica")
            limit = self.max_queued_tokens
            if limit is not None and self._queued_items and self._queued_tokens + tokens > limit:
                raise Overloaded(f"the queue holds {self._queued_tokens} tokens; this request "
                                 f"adds {tokens} (limit {limit})", self.retry_after())
            self._queue.extend((ticket, i) for i in range(len(rows)))
            self._queued_items += len(rows)
            self._queued_tokens += tokens
            self._cond.notify()
        ticket.future.add_done_callback(lambda _: self._forget(ticket))
        return ticket

    @property
    def queued_items(self) -> int:
        """Inputs waiting for a batch (cancelled ones excluded)."""
        return self._queued_items

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    def retry_after(self) -> int:
        """Seconds until the queued tokens have likely run (1–60)."""
        rate = self._tokens_per_s
        wait = self._queued_tokens / rate if rate > 0 else 1.0
        return int(min(60, max(1, math.ceil(wait))))

    def _forget(self, ticket: Ticket) -> None:
        """A cancelled or failed request's queued items no longer count (they are skipped)."""
        with self._cond:
            self._queued_tokens -= ticket.pending_tokens
            self._queued_items -= ticket.pending_items
            ticket.pending_tokens = ticket.pending_items = 0

    # -- the worker side --------------------------------------------------------------------

    def _work(self) -> None:
        """A worker's loop, supervised: whatever a batch raises (the model, copying its rows,
        the metrics hook) fails that batch's unfinished requests and the loop goes on, so
        one error can never leave later requests waiting on a dead worker."""
        while (batch := self._next_batch()) is not None:
            try:
                self._run(batch)
            except BaseException as exc:
                with self._cond:
                    self.worker_restarts += 1
                log.exception("batch of %d inputs failed outside the model run; its "
                              "requests fail, the worker goes on", len(batch))
                self._fail([t for t in dict.fromkeys(t for t, _ in batch)
                            if not t.future.done()], exc)

    def _next_batch(self) -> list[Item] | None:
        with self._cond:
            while True:
                while self._planned:
                    batch = [it for it in self._planned.popleft() if not it[0].future.done()]
                    if batch:
                        self._start(batch)
                        return batch
                if self._queue and not self._should_wait():
                    self._take_window()
                    continue
                if self._closing and not self._queue:
                    self._cond.notify_all()
                    return None
                self._cond.wait(self._wait_timeout())

    def _should_wait(self) -> bool:
        if not self.max_wait_s or self._closing or self._queued_items >= self.max_batch_size:
            return False
        return time.perf_counter() - self._queue[0][0].submitted < self.max_wait_s

    def _wait_timeout(self) -> float | None:
        if not self._queue or not self.max_wait_s:
            return None
        return max(0.0, self._queue[0][0].submitted + self.max_wait_s - time.perf_counter())

    def _take_window(self) -> None:
        """Move the head of the queue into planned batches (called holding the lock)."""
        window: list[Item] = []
        tokens = 0
        while self._queue and len(window) < self._window_items:
            ticket, i = self._queue[0]
            if ticket.future.done():  # cancelled or failed: already uncounted
                self._queue.popleft()
                continue
            n = len(ticket.rows[i])
            if window and tokens + n > self._window_tokens:
                break
            window.append(self._queue.popleft())
            tokens += n
        if not window:
            return
        try:
            plan = self._plan([len(t.rows[i]) for t, i in window], self.max_batch_size)
        except Exception as exc:  # a planner bug fails this window, not the worker
            self._fail(list(dict.fromkeys(t for t, _ in window)), exc)
            return
        self._planned.extend([window[j] for j in idx] for idx in plan)

    def _start(self, batch: list[Item]) -> None:
        """The batch leaves the queue's accounting (called holding the lock)."""
        now = time.perf_counter()
        for ticket, i in batch:
            n = len(ticket.rows[i])
            ticket.pending_tokens -= n
            ticket.pending_items -= 1
            self._queued_tokens -= n
            self._queued_items -= 1
            if ticket.started is None:
                ticket.started = now

    def _run(self, batch: list[Item]) -> None:
        rows = [t.rows[i] for t, i in batch]
        tickets = list(dict.fromkeys(t for t, _ in batch))
        start = time.perf_counter()
        try:
            vecs = self._run_batch(rows)
        except BaseException as exc:  # a failing batch fails only its own requests
            self._fail(tickets, exc)
            return
        seconds = time.perf_counter() - start
        done = []
        with self._cond:
            for k, (ticket, i) in enumerate(batch):
                ticket.out[i] = vecs[k]
                ticket.remaining -= 1
            for ticket in tickets:
                ticket.inference_s += seconds
                if ticket.remaining == 0:
                    ticket.finished = time.perf_counter()
                    done.append(ticket)
            tokens = sum(len(r) for r in rows)
            rate = tokens / max(seconds, 1e-6)
            self._tokens_per_s = rate if not self._tokens_per_s else (
                0.8 * self._tokens_per_s + 0.2 * rate)
        for ticket in done:
            _settle(ticket.future, result=ticket.out)
        if self._on_batch is not None:
            try:
                self._on_batch(len(rows), len(rows) * max(len(r) for r in rows), seconds)
            except Exception:  # metrics must never cost a request or a worker
                log.exception("the on_batch hook failed")

    def _fail(self, tickets: list[Ticket], exc: BaseException) -> None:
        for ticket in tickets:
            ticket.finished = time.perf_counter()
            _settle(ticket.future, exc=exc)

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop admitting; with `drain`, run what is queued first, else fail it with
        ClosedError. Waits for the workers (up to `timeout` seconds)."""
        dropped: set[Ticket] = set()
        with self._cond:
            self._closing = True
            if not drain:
                dropped = {t for t, _ in self._queue}
                dropped.update(t for b in self._planned for t, _ in b)
                for ticket in dropped:
                    ticket.pending_items = ticket.pending_tokens = 0
                self._queue.clear()
                self._planned.clear()
                self._queued_items = self._queued_tokens = 0
            self._cond.notify_all()
        for ticket in dropped:
            _settle(ticket.future, exc=ClosedError("the server shut down before this request "
                                                   "ran"))
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closing

    def __enter__(self) -> Batcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _settle(future: Future, result: object = None, exc: BaseException | None = None) -> None:
    """Resolve a future unless it was cancelled meanwhile (the client went away)."""
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass
