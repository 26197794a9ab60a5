"""The batcher alone, on a fake session: token budget, FIFO between windows, cancellation,
error isolation, admission, drain; then on a real Encoder against `encode`."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from angle_rt import ClosedError, Encoder
from angle_rt.batching import plan_batches
from angle_rt.serve.batcher import Batcher, Overloaded

DIM = 4
POISON = 666


class FakeSession:
    """run_batch stand-in: row → [len, first id, last id, batch number]; records batches;
    blocks while `gate` is clear; raises on a row holding POISON."""

    def __init__(self, delay: float = 0.0, gate_over: int = 0) -> None:
        self.gate_over = gate_over  # the gate holds only batches with a row longer than this
        self.batches: list[list[list[int]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.delay, self.running, self.most_running = delay, 0, 0
        self._lock = threading.Lock()

    def run_batch(self, rows):
        with self._lock:
            self.batches.append([list(r) for r in rows])
            number = len(self.batches)
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        self.entered.set()
        try:
            if max(len(r) for r in rows) > self.gate_over:
                assert self.gate.wait(10), "test gate never opened"
            time.sleep(self.delay)
            if any(POISON in r for r in rows):
                raise RuntimeError("poisoned batch")
            return np.array([[len(r), r[0], r[-1], number] for r in rows], dtype=np.float32)
        finally:
            with self._lock:
                self.running -= 1


def make(fake: FakeSession, budget: int = 64, **kw) -> Batcher:
    kw.setdefault("max_batch_size", 8)
    return Batcher(fake.run_batch, lambda lengths, bs: plan_batches(lengths, bs, budget),
                   DIM, max_batch_tokens=budget, **kw)


def hold(fake: FakeSession, batcher: Batcher) -> None:
    """Park the worker inside a first batch, so what is submitted next queues up."""
    fake.gate.clear()
    fake.entered.clear()
    batcher.submit([[0]])
    assert fake.entered.wait(5)


def rows_of(lengths, start: int = 0) -> list[list[int]]:
    return [[start + i] * n for i, n in enumerate(lengths)]


def check(ticket, rows) -> None:
    out = ticket.future.result(10)
    assert out.shape == (len(rows), DIM)
    for vec, row in zip(out, rows, strict=True):
        assert vec[:3].tolist() == [len(row), row[0], row[-1]]


def test_token_budget_and_batch_cap_hold_and_vectors_go_home():
    rng = np.random.default_rng(0)
    fake = FakeSession()
    with make(fake, budget=64) as b:
        hold(fake, b)
        requests = [rows_of(rng.integers(1, 40, size=rng.integers(1, 12)).tolist(), 100 * k)
                    for k in range(40)]
        tickets = [b.submit(r) for r in requests]
        assert b.queued_items == sum(map(len, requests))
        fake.gate.set()
        for ticket, rows in zip(tickets, requests, strict=True):
            check(ticket, rows)
        assert b.queued_items == 0 and b.queued_tokens == 0
    for batch in fake.batches[1:]:
        assert len(batch) <= 8
        assert len(batch) == 1 or len(batch) * max(map(len, batch)) <= 64


def test_fifo_between_windows_under_a_flood_of_long_texts():
    """A short text queued behind long ones runs before anything queued a window after it;
    sorting the whole queue by length would run every long text first."""
    fake = FakeSession()
    with make(fake, budget=64, window_batches=2) as b:  # window: 16 items
        hold(fake, b)
        before = [b.submit([[1] * 30]) for _ in range(40)]
        short = b.submit([[7, 7]])
        after = [b.submit([[2] * 30]) for _ in range(40)]
        fake.gate.set()
        short.future.result(10)
        for t in before + after:
            t.future.result(10)
    batch_of = {}
    for n, batch in enumerate(fake.batches):
        for row in batch:
            batch_of.setdefault(row[0], []).append(n)
    short_batch = batch_of[7][0]
    later = sorted(batch_of[2])
    # only items of `after` that shared the short text's window (16 items) may run first
    assert sum(n < short_batch for n in later) <= 15
    assert short_batch < later[-1] and max(batch_of[1]) <= short_batch + 1


def test_cancelled_requests_are_dropped_and_uncounted():
    fake = FakeSession()
    with make(fake) as b:
        hold(fake, b)
        gone = b.submit([[POISON, 5]] * 6)  # would fail the batch if it ran
        kept = b.submit([[3, 4]])
        assert b.queued_items == 7
        assert gone.future.cancel()
        assert b.queued_items == 1 and b.queued_tokens == 2
        fake.gate.set()
        check(kept, [[3, 4]])
    assert not any(POISON in row for batch in fake.batches for row in batch)


def test_a_failing_batch_fails_only_its_own_requests():
    fake = FakeSession()
    with make(fake, max_batch_size=1) as b:
        hold(fake, b)
        good = [b.submit([[i, i]]) for i in range(1, 4)]
        bad = b.submit([[9, 9], [POISON, 1], [9, 9, 9]])
        more = [b.submit([[i]]) for i in range(4, 7)]
        fake.gate.set()
        with pytest.raises(RuntimeError, match="poisoned"):
            bad.future.result(10)
        for t in good + more:
            t.future.result(10)
        check(b.submit([[42]]), [[42]])  # and the worker keeps serving
        assert b.queued_items == 0 and b.queued_tokens == 0


def test_an_error_outside_the_model_run_never_kills_the_worker():
    """Only run_batch was guarded: a backend returning too few rows (the row copy raises)
    or a failing metrics hook killed the only worker and every later request waited
    forever. Now that batch's requests fail, the worker goes on and counts it."""
    fake = FakeSession()
    short = {"on": True}

    def run_batch(rows):
        out = fake.run_batch(rows)
        return out[:-1] if short["on"] and len(rows) > 1 else out

    def hook(items, tokens, seconds):
        raise ValueError("metrics backend down")

    with Batcher(run_batch, lambda lengths, bs: plan_batches(lengths, bs, 64), DIM,
                 max_batch_tokens=64, max_batch_size=8, on_batch=hook) as b:
        broken = b.submit([[1, 2], [3, 4]])
        with pytest.raises(IndexError):
            broken.future.result(10)
        assert b.worker_restarts == 1
        short["on"] = False
        check(b.submit([[5, 6], [7, 8]]), [[5, 6], [7, 8]])  # served, hook failing or not
        check(b.submit([[9]]), [[9]])
        assert b.worker_restarts == 1 and b.queued_items == 0


def test_admission_refuses_over_the_queued_token_limit():
    fake = FakeSession()
    with make(fake, max_queued_tokens=10) as b:
        hold(fake, b)
        first = b.submit([[1] * 8])
        with pytest.raises(Overloaded) as err:
            b.submit([[2] * 5])
        assert 1 <= err.value.retry_after <= 60
        fake.gate.set()
        first.future.result(10)
        # an empty queue takes a request larger than the limit (a big client batch runs alone)
        check(b.submit([[3] * 12]), [[3] * 12])


def test_close_drains_the_queue_then_refuses():
    fake = FakeSession()
    b = make(fake)
    hold(fake, b)
    tickets = [b.submit([[i] * 3, [i]]) for i in range(1, 20)]
    closer = threading.Thread(target=b.close)
    closer.start()
    time.sleep(0.05)
    with pytest.raises(ClosedError):
        b.submit([[1]])
    fake.gate.set()
    closer.join(10)
    assert not closer.is_alive()
    for i, t in enumerate(tickets, 1):
        check(t, [[i] * 3, [i]])


def test_close_without_drain_fails_what_is_queued():
    fake = FakeSession()
    b = make(fake)
    hold(fake, b)
    queued = b.submit([[5]])
    b.close(drain=False, timeout=0.1)
    with pytest.raises(ClosedError, match="shut down"):
        queued.future.result(1)
    fake.gate.set()
    b.close()


def test_abort_fails_what_is_in_flight_and_every_later_request():
    """Past the graceful timeout: queued and running requests fail with abort()'s error, and
    so does a request that was still tokenizing when abort() ran (it submits after), so its
    client gets the same JSON 503 instead of uvicorn's plain-text 500 at the cancel."""
    fake = FakeSession()
    b = make(fake)
    hold(fake, b)
    queued = b.submit([[5], [6]])
    gone = ClosedError("the server shut down")
    assert b.abort(gone) == 2  # the held one and the queued one
    with pytest.raises(ClosedError, match="shut down"):
        queued.future.result(1)
    with pytest.raises(ClosedError, match="the server shut down"):
        b.submit([[7]])
    fake.gate.set()
    b.close()


def test_max_wait_collects_a_batch_and_two_workers_overlap():
    fake = FakeSession(delay=0.05)
    with make(fake, max_wait_ms=200, max_batch_size=4, workers=2) as b:
        tickets = [b.submit([[i]]) for i in range(1, 5)]  # within the wait: one batch
        for t in tickets:
            t.future.result(10)
        assert [len(x) for x in fake.batches] == [4]
        tickets = [b.submit([[i]] * 4) for i in range(1, 9)]
        for t in tickets:
            t.future.result(10)
    assert fake.most_running == 2


def test_empty_request_resolves_at_once():
    fake = FakeSession()
    with make(fake) as b:
        assert b.submit([]).future.result(1).shape == (0, DIM)


def test_concurrent_requests_on_a_real_encoder_equal_encode(tiny_bert_bundle, stsb_test):
    texts = list(dict.fromkeys(stsb_test.sentences))[:120]
    with Encoder(tiny_bert_bundle) as enc:
        want = enc.encode(texts)
        with Batcher(enc.run_batch, enc.plan, enc.dim, max_batch_size=16) as b:
            tickets = []
            threads = [threading.Thread(target=lambda i=i: tickets.append(
                (i, b.submit(enc.tokenize(texts[i:i + 3], None))))) for i in range(0, 120, 3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for i, ticket in tickets:
                np.testing.assert_array_equal(ticket.future.result(30), want[i:i + 3])


def test_a_one_sentence_request_behind_a_flood_runs_in_the_next_window():
    """Two requests of 400 long items each are queued; a one-item request sent after them
    runs right after the window already planned, and the floods then share the worker
    round-robin (neither waits for the other to finish)."""
    fake = FakeSession()
    with make(fake, budget=64, window_batches=2, fair_quantum_tokens=64) as b:
        hold(fake, b)
        flood_a = b.submit([[1] * 30] * 400)
        flood_b = b.submit([[2] * 30] * 400)
        time.sleep(0.05)
        short = b.submit([[7, 7]])
        fake.gate.set()
        short.future.result(10)
        flood_a.future.result(30)
        flood_b.future.result(30)
    first = {}
    for n, batch in enumerate(fake.batches):
        for row in batch:
            first.setdefault(row[0], n)
    assert first[7] <= 6  # in the first window, not after 800 long items (400 batches)
    last = {k: max(n for n, batch in enumerate(fake.batches) for row in batch if row[0] == k)
            for k in (1, 2)}
    assert abs(last[1] - last[2]) <= 2  # interleaved: both finish at the end


def test_new_requests_waiting_are_planned_as_one_window_oldest_first():
    """Arrivals trickle in between batches: a new request is planned together with the new
    requests' batches not started yet (so a short text joins the short ones already
    waiting rather than running alone), and the batch holding the oldest request runs
    first (re-planning longest-first never starves it). Before, each arrival was planned
    apart: B, then D, then C each alone."""
    fake = FakeSession(delay=0.2)
    plan = lambda lengths, bs: plan_batches(lengths, bs, 1000, batch_cost=16)  # noqa: E731
    with Batcher(fake.run_batch, plan, DIM, max_batch_size=8, max_batch_tokens=1000) as b:
        hold(fake, b)
        a, short_b = b.submit([[1] * 40]), b.submit([[2] * 3])  # planned apart: 40 vs 3
        fake.gate.set()
        deadline = time.monotonic() + 5
        while len(fake.batches) < 2 and time.monotonic() < deadline:  # [A] is running
            time.sleep(0.001)
        assert fake.batches[1] == [[1] * 40]
        short_c, long_d = b.submit([[3] * 3]), b.submit([[4] * 40])
        for t in (a, short_b, short_c, long_d):
            t.future.result(10)
    assert fake.batches[2:] == [[[2] * 3, [3] * 3], [[4] * 40]]


def wait_for(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.001)
    return condition()


def hold_both(fake: FakeSession, b: Batcher, lengths: list[int]) -> list:
    """Two requests of these rows, each running (gated) on one of the two workers."""
    fake.gate.clear()
    held = [b.submit(rows_of(lengths, start=10 * k)) for k in (1, 2)]
    assert wait_for(lambda: fake.running == 2)
    return held


def check_held(held: list, lengths: list[int]) -> None:
    for k, ticket in zip((1, 2), held, strict=True):
        check(ticket, rows_of(lengths, start=10 * k))


def test_a_light_request_runs_on_the_lane_while_every_worker_holds_a_long_batch():
    """Both workers are inside a flood's long turns (held there by the gate); a one-sentence
    request sent then is answered on the lane while they are still held. Before the lane it
    waited for a turn to end: one ~217-token text a turn takes ~60 ms on a Zen 3 core, so a
    light request's p99 under the flood was 17.7x its idle p50 (docs/serving.md)."""
    fake = FakeSession(gate_over=8)
    with make(fake, workers=2, lane_tokens=16, fair_quantum_tokens=64) as b:
        floods = hold_both(fake, b, [30] * 6)
        short = b.submit([[7, 7]])
        check(short, [[7, 7]])
        assert fake.running == 2 and not any(f.future.done() for f in floods)
        # a request over the lane's tokens (3 x 8 = 24 > 16) waits for a worker
        wide = b.submit(rows_of([8, 8, 8], start=50))
        time.sleep(0.05)
        assert not wide.future.done()
        fake.gate.set()
        check(wide, rows_of([8, 8, 8], start=50))
        check_held(floods, [30] * 6)
        assert b.live_workers() == 2
    assert [len(x) for x in fake.batches].count(1) >= 1
    assert fake.most_running == 3


def test_the_lane_stays_idle_while_a_worker_is_free_or_in_a_small_batch():
    """Small batches only (every worker would soon be free): the lane never runs, so the
    load of many small clients runs on exactly `workers` threads, as before."""
    fake = FakeSession(delay=0.01)
    with make(fake, workers=2, lane_tokens=16, max_batch_size=2) as b:
        tickets = [b.submit([[i, i]]) for i in range(1, 41)]
        for i, t in enumerate(tickets, 1):
            check(t, [[i, i]])
    assert fake.most_running == 2


def test_the_lane_stays_idle_while_workers_run_batches_of_small_requests():
    """Both workers held inside batches of many one-row requests (more padded tokens than
    the lane's, each request small enough for it): what 32 one-sentence clients make. The
    lane stays out, so such load runs on `workers` threads; when it engaged on any batch
    over its tokens, a third thread on the 2 cores cost 14% of the sent/s at 32 clients
    (MiniLM, Zen 4, docs/serving.md)."""
    fake = FakeSession(gate_over=3)
    with make(fake, workers=2, lane_tokens=16) as b:
        fake.gate.clear()
        with b._cond:  # queued together, so the window plans two batches of 8 (32 tokens)
            small = [b.submit([[k] * 4]) for k in range(1, 17)]
        assert wait_for(lambda: fake.running == 2)
        short = b.submit([[7, 7]])
        time.sleep(0.05)
        assert not short.future.done() and fake.most_running == 2
        assert [len(x) for x in fake.batches] == [8, 8]
        fake.gate.set()
        check(short, [[7, 7]])
        for k, ticket in enumerate(small, 1):
            check(ticket, [[k] * 4])
    assert fake.most_running == 2


def test_the_lane_runs_beside_turns_of_a_flood_of_short_texts():
    """A flood of texts narrower than the lane's tokens still runs whole turns (a quantum of
    tokens) on every worker: a light request sent then runs on the lane. Deciding by the
    width of the running rows missed this flood."""
    fake = FakeSession(gate_over=5)
    with make(fake, workers=2, lane_tokens=16, fair_quantum_tokens=64) as b:
        floods = hold_both(fake, b, [6] * 20)
        short = b.submit([[7, 7]])
        check(short, [[7, 7]])
        assert not any(f.future.done() for f in floods)
        fake.gate.set()
        check_held(floods, [6] * 20)
    assert fake.most_running == 3


def test_the_lane_without_workers_held_and_closing():
    """A lane-only batcher config is refused nothing: with the workers free it never takes
    work; close() drains through the workers and the lane thread ends too."""
    fake = FakeSession()
    b = make(fake, workers=1, lane_tokens=64)
    tickets = [b.submit(rows_of([3, 4], start=i * 10)) for i in range(5)]
    b.close()
    for i, t in enumerate(tickets):
        check(t, rows_of([3, 4], start=i * 10))
    assert all(not t.is_alive() for t in b._threads)


def test_lane_vectors_equal_encode_on_a_real_encoder(tiny_bert_bundle, stsb_test):
    """The lane runs the same Encoder: short sentences answered there while the workers are
    held in long batches get exactly `encode`'s vectors."""
    texts = sorted(dict.fromkeys(stsb_test.sentences), key=len)
    short, long = texts[:24], texts[-8:]
    gate = threading.Event()
    with Encoder(tiny_bert_bundle) as enc:
        want_short, want_long = enc.encode(short), enc.encode(long)
        cut = max(len(r) for r in enc.tokenize(short, None))

        def run_batch(rows):
            if max(len(r) for r in rows) > cut:
                assert gate.wait(30)
            return enc.run_batch(rows)

        with Batcher(run_batch, enc.plan, enc.dim, workers=2, max_batch_size=16,
                     fair_quantum_tokens=1, lane_tokens=4 * cut) as b:
            floods = [b.submit(enc.tokenize(long[k::2], None)) for k in (0, 1)]
            assert wait_for(lambda: len(b._running) == 2)
            tickets = [(i, b.submit(enc.tokenize(short[i:i + 3], None)))
                       for i in range(0, 24, 3)]
            for i, ticket in tickets:
                np.testing.assert_array_equal(ticket.future.result(30),
                                              want_short[i:i + 3])
            assert not any(f.future.done() for f in floods)
            gate.set()
            for k, flood in enumerate(floods):
                np.testing.assert_array_equal(flood.future.result(30), want_long[k::2])


def test_one_large_request_runs_on_every_worker():
    """A lone request of many turns keeps both workers busy. Before, submit woke one worker
    and nothing woke the second, so a lone 2,048-sentence request ran on one core (351
    sentences/s served vs 668 with both, MiniLM on 2 Zen 3 cores)."""
    fake = FakeSession(delay=0.02)
    with make(fake, workers=2, fair_quantum_tokens=4) as b:
        time.sleep(0.05)  # both workers asleep, waiting for work
        check(b.submit(rows_of([2] * 40)), rows_of([2] * 40))
    assert fake.most_running == 2
