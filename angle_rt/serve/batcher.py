"""Dynamic batching across requests: one queue item per input, batches under a padded-token
budget, length-sorted within a window, requests interleaved between windows.

No web framework and no torch here: the batcher runs plain callables (`Encoder.run_batch`
and `Encoder.plan` in the server, fakes in the tests) on its own worker threads, and hands
each request a `concurrent.futures.Future` (asyncio code awaits it via `asyncio.wrap_future`).

How a batch is formed (the worker that is free takes the next one):

1. Turns: a request's items are taken longest first, a turn at a time: ≤ max_batch_size
   items and ≤ fair_quantum_tokens tokens (at least one item); started requests take turns
   round-robin.
2. New requests first: the first turn of every request not started yet (in arrival order,
   up to `window_batches` batches) is planned apart and runs before queued turns — but
   never twice in a row while a started request waits, so a stream of new requests
   cannot starve a flood. A one-sentence request behind a flood thus waits for the batch
   running, not for the flood (`benchmarks/serve_flood.py` measures it).
3. Each window is planned by `plan(lengths, max_batch_size)` — the Encoder's own planner,
   so batches are length-sorted and padded exactly as `Encoder.encode` pads them. New
   requests' first turns not started yet are re-planned with each arrival into one window
   (the batch with the oldest request first). Cancelled or failed requests are dropped.
4. No artificial wait (`max_wait_ms=0`): a worker takes whatever is queued. With a wait, a
   worker holds off until a full batch is queued or the oldest item waited that long.
5. The lane (`lane_tokens` > 0): one more thread that runs only new requests small enough
   (≤ `lane_tokens` padded tokens together), and only while every worker runs a turn of a
   request too large for the lane. ONNX Runtime cannot pre-empt a running batch, and on a
   slow core one turn of a flood (~250 tokens) takes ~60 ms: without the lane a
   one-sentence request waited for a turn to end; with it the OS shares the cores at once.
   Batches of small requests only (what many small clients make) do not engage it: a third
   thread on the cores cost 14% of the sent/s at 32 clients when they did (measured:
   docs/serving.md).
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
    order: list[int] = field(default_factory=list)  # its items, longest first
    cursor: int = 0  # items of `order` already taken into a window

    @property
    def untaken(self) -> bool:
        return self.cursor < len(self.order)

    @property
    def queue_s(self) -> float:
        return (self.started or self.submitted) - self.submitted

    @property
    def tokens(self) -> int:
        return sum(len(r) for r in self.rows)

    @property
    def width(self) -> int:
        """Its longest row (`order` is longest first)."""
        return len(self.rows[self.order[0]]) if self.order else 0

    @property
    def padded(self) -> int:
        """Its tokens padded as one batch."""
        return len(self.rows) * self.width


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
        fair_quantum_tokens: int = 2048,
        lane_tokens: int = 0,
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
        self.fair_quantum_tokens = fair_quantum_tokens
        self.lane_tokens = max(0, lane_tokens)
        self.workers = workers
        self._on_batch = on_batch
        lock = threading.RLock()
        self._cond = threading.Condition(lock)
        # the lane waits apart, on the same lock: woken only when it can run something,
        # never taking a worker's wake-up, and not at every arrival
        self._lane_cond = threading.Condition(lock)
        self._fresh: deque[Ticket] = deque()  # requests none of whose items ran yet
        self._rotation: deque[Ticket] = deque()  # started requests with items left
        self._planned: deque[list[Item]] = deque()  # batches of started requests' turns
        self._planned_fresh: deque[list[Item]] = deque()  # batches of new requests
        self._owe_turn = False  # a new request's batch ran; a turn runs before the next
        self._queued_items = self._queued_tokens = 0
        self._closing = False
        self._aborted: BaseException | None = None  # abort()'s error: later submits get it
        self._tokens_per_s = 0.0  # moving average, for Retry-After
        self.worker_restarts = 0  # batches that failed outside the model run (see _work)
        self.last_ok: float | None = None  # perf_counter when a batch last succeeded
        # thread id → (start, holds part of a request too large for the lane) of its batch
        self._running: dict[int, tuple[float, bool]] = {}
        self._lane_id: int | None = None
        self._active: set[Ticket] = set()  # submitted, not yet resolved
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(workers)]
        if self.lane_tokens:
            self._threads.append(threading.Thread(target=self._work, args=(True,),
                                                  name=f"{name}-lane", daemon=True))
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
            if self._aborted is not None:  # tokenized while abort() ran: fail it the same way
                raise type(self._aborted)(*self._aborted.args)
            if self._closing:
                raise ClosedError("the server is shutting down; retry on another replica")
            limit = self.max_queued_tokens
            if limit is not None and self._queued_items and self._queued_tokens + tokens > limit:
                raise Overloaded(f"the queue holds {self._queued_tokens} tokens; this request "
                                 f"adds {tokens} (limit {limit})", self.retry_after())
            self._active.add(ticket)
            # longest first: a request's items come out length-sorted, as encode sorts them
            ticket.order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
            self._fresh.append(ticket)
            self._queued_items += len(rows)
            self._queued_tokens += tokens
            self._wake()
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
            self._active.discard(ticket)
            self._queued_tokens -= ticket.pending_tokens
            self._queued_items -= ticket.pending_items
            ticket.pending_tokens = ticket.pending_items = 0

    # -- the worker side --------------------------------------------------------------------

    def _wake(self) -> None:
        """Called holding the lock when work is queued: a worker, and the lane if every
        worker is held (it can run the new work now)."""
        self._cond.notify()
        if self.lane_tokens and self._workers_held():
            self._lane_cond.notify()

    def _wake_all(self) -> None:
        self._cond.notify_all()
        self._lane_cond.notify_all()

    def _work(self, lane: bool = False) -> None:
        """A worker's loop, supervised: whatever a batch raises (the model, copying its rows,
        the metrics hook) fails that batch's unfinished requests and the loop goes on, so
        one error can never leave later requests waiting on a dead worker."""
        if lane:
            self._lane_id = threading.get_ident()
        while True:
            batch: list[Item] = []
            try:
                batch = (self._next_lane_batch() if lane else self._next_batch()) or []
                if not batch:
                    return
                self._run(batch)
            except BaseException as exc:
                with self._cond:
                    self.worker_restarts += 1
                log.exception("batch of %d inputs failed outside the model run; its "
                              "requests fail, the worker goes on", len(batch))
                self._fail([t for t in dict.fromkeys(t for t, _ in batch)
                            if not t.future.done()], exc)
            finally:
                with self._cond:
                    self._running.pop(threading.get_ident(), None)

    # -- health -----------------------------------------------------------------------------

    def live_workers(self) -> int:
        """Workers alive (the lane not counted: it only ever adds to them)."""
        return sum(t.is_alive() for t in self._threads[:self.workers])

    def stalled_s(self) -> float:
        """How long the longest-running batch has been running (0: none running)."""
        starts = [start for start, _ in list(self._running.values())]
        return time.perf_counter() - min(starts) if starts else 0.0

    @property
    def idle(self) -> bool:
        return not self._running and not self._queued_items

    def _next_batch(self) -> list[Item] | None:
        with self._cond:
            while True:
                batch = self._pop_planned()
                if batch:
                    self._start(batch)
                    self._pass_on()
                    return batch
                if (self._fresh or self._rotation) and not self._should_wait():
                    self._take_window()
                    continue
                if self._closing and not (self._fresh or self._rotation):
                    self._wake_all()
                    return None
                self._cond.wait(self._wait_timeout())

    def _pass_on(self) -> None:
        """Work is left after this worker took a batch: wake another (one submit wakes one
        worker, so without this a lone large request ran on one worker), and the lane,
        which may now find every worker busy."""
        if self._planned or self._planned_fresh or self._fresh or self._rotation:
            self._wake()

    def _next_lane_batch(self) -> list[Item] | None:
        """The lane's next batch: new requests that fit it, while every worker runs a turn of
        a large request (else a worker will take them soon enough). None once closing."""
        with self._cond:
            while not self._closing:
                if self._workers_held():
                    batch = self._take_small()
                    if batch:
                        self._start(batch)
                        return batch
                self._lane_cond.wait()
            return None

    def _workers_held(self) -> bool:
        """Every worker is running a turn of a request too large for the lane (a flood's):
        such turns run a whole quantum, where batches of small requests end soon."""
        held = [large for tid, (_, large) in self._running.items() if tid != self._lane_id]
        return len(held) >= self.workers and all(held)

    def _fits_lane(self, ticket: Ticket) -> bool:
        return len(ticket.rows) <= self.max_batch_size and ticket.padded <= self.lane_tokens

    def _take_small(self) -> list[Item]:
        """Whole new requests, oldest first, while together they fit `lane_tokens` padded
        tokens and `max_batch_size` items; withdrawn from wherever they were queued."""
        candidates = dict.fromkeys(t for b in self._planned_fresh for t, _ in b)
        candidates.update(dict.fromkeys(self._fresh))
        taken: list[Ticket] = []
        longest = count = 0
        for ticket in sorted(candidates, key=lambda t: t.submitted):
            if ticket.started is not None or ticket.future.done():
                continue
            n = len(ticket.rows)
            if count + n > self.max_batch_size:
                continue
            size = max(longest, ticket.width)
            if (count + n) * size > self.lane_tokens:
                continue
            taken.append(ticket)
            longest, count = size, count + n
        if not taken:
            return []
        self._withdraw(set(taken))
        items = [(t, i) for t in taken for i in t.order]
        items.sort(key=lambda it: -len(it[0].rows[it[1]]))  # longest first, as plan sorts
        return items

    def _withdraw(self, tickets: set[Ticket]) -> None:
        """Take these requests' items out of every queue and plan (they run now)."""
        for queue in (self._planned_fresh, self._planned):
            kept = [[it for it in b if it[0] not in tickets] for b in queue]
            queue.clear()
            queue.extend(b for b in kept if b)
        self._fresh = deque(t for t in self._fresh if t not in tickets)
        self._rotation = deque(t for t in self._rotation if t not in tickets)
        for ticket in tickets:
            ticket.cursor = len(ticket.order)

    def _pop_planned(self) -> list[Item] | None:
        """The next planned batch: new requests' batches first, but never two in a row
        while started requests wait for a turn (so a stream of new requests cannot starve
        a flood); a new request that arrived meanwhile is planned ahead of queued turns."""
        while True:
            if self._fresh and not self._owe_turn and not self._should_wait():
                self._replan_fresh()
            if self._owe_turn and not self._planned and self._rotation:
                self._plan_turn()
            if self._owe_turn and self._planned:
                queue, self._owe_turn = self._planned, False
            elif self._planned_fresh:
                queue = self._planned_fresh
                self._owe_turn = bool(self._planned or self._rotation)
            elif self._planned:
                queue = self._planned
            else:
                return None
            batch = [it for it in queue.popleft() if not it[0].future.done()]
            if batch:
                return batch

    def _should_wait(self) -> bool:
        if not self.max_wait_s or self._closing or self._queued_items >= self.max_batch_size:
            return False
        return time.perf_counter() - self._oldest().submitted < self.max_wait_s

    def _wait_timeout(self) -> float | None:
        if not (self._fresh or self._rotation) or not self.max_wait_s:
            return None
        return max(0.0, self._oldest().submitted + self.max_wait_s - time.perf_counter())

    def _oldest(self) -> Ticket:
        return min((q[0] for q in (self._fresh, self._rotation) if q),
                   key=lambda t: t.submitted)

    def _take_window(self) -> None:
        """Plan the next turn (called holding the lock, nothing planned). A turn is up to
        max_batch_size items and `fair_quantum_tokens` tokens of one request (its items
        come longest first, so a turn is as well sorted as a bigger window), round-robin:
        a one-sentence request behind a flood waits for the batch running, and a request
        alone pays little for the small turns on CPU (measured: docs/serving.md)."""
        self._fresh = deque(t for t in self._fresh if not t.future.done())
        self._rotation = deque(t for t in self._rotation if not t.future.done())
        if self._fresh and not (self._owe_turn and self._rotation):
            self._replan_fresh()
        elif self._rotation:
            self._plan_turn()

    def _replan_fresh(self) -> None:
        """Plan new requests' first turns together with those planned but not started, while
        they fit one window: one window of everything waiting sorts and splits better than
        one per arrival (arrivals trickle in between batches; measured: docs/serving.md).
        The batch holding the oldest request goes first, so re-planning never starves it;
        past a window, new requests get a window of their own, after (FIFO between windows)."""
        planned = self._planned_fresh
        waiting = [it for batch in planned for it in batch if not it[0].future.done()]
        tokens = sum(len(t.rows[i]) for t, i in waiting)
        if len(waiting) >= self._window_items or tokens >= self._window_tokens:
            self._plan_window(self._fresh_window(), planned)
            return
        planned.clear()
        self._plan_window(waiting + self._fresh_window(len(waiting), tokens), planned)
        if len(planned) > 1:
            first = min(range(len(planned)),
                        key=lambda k: min(t.submitted for t, _ in planned[k]))
            oldest = planned[first]
            del planned[first]  # by position: tickets do not compare by value
            planned.appendleft(oldest)

    def _plan_turn(self) -> None:
        """The next started request's turn, into the planned batches."""
        ticket = self._rotation.popleft()
        window = self._quantum(ticket, self.max_batch_size, self.fair_quantum_tokens)
        if ticket.untaken:
            self._rotation.append(ticket)  # its turn is over: to the back
        self._plan_window(window, self._planned)

    def _fresh_window(self, items: int = 0, tokens: int = 0) -> list[Item]:
        """A first turn for each new request, in arrival order, up to a window (of which
        `items` and `tokens` are taken already)."""
        self._fresh = deque(t for t in self._fresh if not t.future.done())
        budget = self.fair_quantum_tokens
        window: list[Item] = []
        while self._fresh and items + len(window) < self._window_items \
                and tokens < self._window_tokens:
            ticket = self._fresh.popleft()
            taken = self._quantum(ticket, self.max_batch_size, budget)
            window += taken
            tokens += sum(len(ticket.rows[i]) for _, i in taken)
            if ticket.untaken:
                self._rotation.append(ticket)
        return window

    def _plan_window(self, window: list[Item], into: deque[list[Item]]) -> None:
        if not window:
            return
        try:
            plan = self._plan([len(t.rows[i]) for t, i in window], self.max_batch_size)
        except Exception as exc:  # a planner bug fails this window, not the worker
            self._fail(list(dict.fromkeys(t for t, _ in window)), exc)
            return
        into.extend([window[j] for j in idx] for idx in plan)

    def _quantum(self, ticket: Ticket, items: int, tokens: int) -> list[Item]:
        """Up to `items` of the ticket's next items within `tokens` (at least one)."""
        out: list[Item] = []
        used = 0
        while ticket.untaken and len(out) < items:
            i = ticket.order[ticket.cursor]
            n = len(ticket.rows[i])
            if out and used + n > tokens:
                break
            out.append((ticket, i))
            used += n
            ticket.cursor += 1
        return out

    def _start(self, batch: list[Item]) -> None:
        """The batch leaves the queue's accounting and is this thread's running batch
        (called holding the lock, by the thread about to run it)."""
        now = time.perf_counter()
        large = bool(self.lane_tokens) and not all(self._fits_lane(t) for t, _ in batch)
        self._running[threading.get_ident()] = (now, large)
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
            self.last_ok = time.perf_counter()
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
                dropped = set(self._rotation) | set(self._fresh)
                dropped.update(t for q in (self._planned, self._planned_fresh)
                               for b in q for t, _ in b)
                for ticket in dropped:
                    ticket.pending_items = ticket.pending_tokens = 0
                self._rotation.clear()
                self._fresh.clear()
                self._planned_fresh.clear()
                self._planned.clear()
                self._queued_items = self._queued_tokens = 0
            self._wake_all()
        for ticket in dropped:
            _settle(ticket.future, exc=ClosedError("the server shut down before this request "
                                                   "ran"))
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)

    def abort(self, exc: BaseException) -> int:
        """Fail every unresolved request with `exc` (queued or in a running batch, whose
        result is then dropped), and every request submitted after it; returns how many it
        failed now. For a shutdown past its grace period."""
        with self._cond:
            self._aborted = exc
            tickets = list(self._active)
        for ticket in tickets:
            _settle(ticket.future, exc=exc)
        return sum(t.future.exception() is exc for t in tickets if t.future.done()
                   and not t.future.cancelled())

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
