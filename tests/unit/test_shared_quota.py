"""The worker supervisor's shared quota buckets (issue 19): processes spending from one bucket
get its burst once between them, never once each."""

from __future__ import annotations

import multiprocessing as mp
import time

from vaultline.workers import SharedBuckets


def _spend(buckets: SharedBuckets, tries: int, results: mp.Queue) -> None:  # type: ignore[type-arg]
    taken = sum(buckets.take("tokenize:spiffe://vaultline/ivr/a", 100.0, 0.0, 1,
                             time.monotonic()) for _ in range(tries))
    results.put(taken)


def test_processes_share_one_bucket() -> None:
    ctx = mp.get_context("spawn")
    buckets = SharedBuckets(["spiffe://vaultline/ivr/a", "tokenize:spiffe://vaultline/ivr/a"])
    results = ctx.Queue()
    procs = [ctx.Process(target=_spend, args=(buckets, 80, results)) for _ in range(3)]
    for p in procs:
        p.start()
    taken = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    assert sum(taken) == 100  # 240 tries, a burst of 100, no refill
    # The other kind of quota of the same identity is a bucket of its own.
    assert buckets.take("spiffe://vaultline/ivr/a", 5.0, 0.0, 5, time.monotonic())


def test_a_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    buckets = SharedBuckets(["k"])
    assert buckets.take("k", 10.0, 2.0, 10, 100.0)
    assert not buckets.take("k", 10.0, 2.0, 1, 100.0)
    assert buckets.take("k", 10.0, 2.0, 4, 102.0)  # 2 s × 2/s refilled
    assert not buckets.take("k", 10.0, 2.0, 1, 102.0)
    assert buckets.take("k", 10.0, 2.0, 10, 200.0)  # never more than the burst
    assert not buckets.take("k", 10.0, 2.0, 1, 200.0)
    assert buckets.take("unlisted", 3.0, 0.0, 3, 1.0)  # a key the policy did not list
