"""TokenBudgetQueue: the pure batching state (no threads, no model)."""

from __future__ import annotations

import random

import pytest

from bei.scheduler.queue import TokenBudgetQueue


def push_all(queue: TokenBudgetQueue[tuple[int, int]], lengths: list[int], start: int = 0) -> list[tuple[int, int]]:
    """Push jobs whose payload is (job id, length); returns the payloads in push order."""
    jobs = [(start + i, n) for i, n in enumerate(lengths)]
    for job in jobs:
        queue.push(job[1], job)
    return jobs


def check_batch(batch: list[tuple[int, int]], budget: int, max_requests: int) -> None:
    assert batch, "a non-empty queue must give a non-empty batch"
    lengths = [n for _, n in batch]
    assert lengths == sorted(lengths), f"batch not sorted by length: {lengths}"
    assert len(batch) <= max_requests
    if len(batch) > 1:
        assert len(batch) * max(lengths) <= budget, f"{len(batch)} rows x {max(lengths)} tokens > budget {budget}"


def test_empty_queue_gives_empty_batch() -> None:
    queue: TokenBudgetQueue[str] = TokenBudgetQueue(100, 10)
    assert queue.next_batch() == []
    queue.push(3, "a")
    assert queue.next_batch() == ["a"]
    assert queue.next_batch() == []
    assert len(queue) == 0


def test_rejects_non_positive_limits() -> None:
    with pytest.raises(ValueError):
        TokenBudgetQueue(0, 4)
    with pytest.raises(ValueError):
        TokenBudgetQueue(4, 0)


def test_token_budget_is_respected() -> None:
    queue: TokenBudgetQueue[tuple[int, int]] = TokenBudgetQueue(max_batch_tokens=100, max_batch_requests=1000)
    push_all(queue, [10] * 25)  # 250 padded tokens in all: three batches of at most 10 rows
    sizes = []
    while len(queue):
        batch = queue.next_batch()
        check_batch(batch, 100, 1000)
        sizes.append(len(batch))
    assert sizes == [10, 10, 5]


def test_budget_counts_padding_to_the_longest_row() -> None:
    queue: TokenBudgetQueue[tuple[int, int]] = TokenBudgetQueue(max_batch_tokens=100, max_batch_requests=1000)
    # 4 short rows + one of 40: 5 x 40 = 200 padded positions, over the budget though only 48 real tokens
    push_all(queue, [2, 2, 2, 2, 40])
    first = queue.next_batch()
    check_batch(first, 100, 1000)
    assert len(first) < 5


def test_max_requests_is_respected() -> None:
    queue: TokenBudgetQueue[tuple[int, int]] = TokenBudgetQueue(max_batch_tokens=10_000, max_batch_requests=4)
    push_all(queue, [1] * 10)
    sizes = [len(queue.next_batch()) for _ in range(3)]
    assert sizes == [4, 4, 2]
    assert queue.next_batch() == []


def test_batch_is_sorted_by_length() -> None:
    queue: TokenBudgetQueue[tuple[int, int]] = TokenBudgetQueue(max_batch_tokens=10_000, max_batch_requests=100)
    lengths = [7, 3, 9, 1, 5, 5, 2]
    push_all(queue, lengths)
    batch = queue.next_batch()
    assert [n for _, n in batch] == sorted(lengths)
    # equal lengths keep arrival order
    assert [j for j, n in batch if n == 5] == [4, 5]


def test_similar_lengths_are_grouped() -> None:
    """Short jobs do not pad to a long one: the long job goes in a batch of its own length class."""
    queue: TokenBudgetQueue[tuple[int, int]] = TokenBudgetQueue(max_batch_tokens=64, max_batch_requests=100)
    push_all(queue, [4, 60, 4, 4, 4])  # the oldest (id 0) is short
    first = queue.next_batch()
    assert [n for _, n in first] == [4, 4, 4, 4]
    assert queue.next_batch() == [(1, 60)]


def test_oldest_job_is_in_the_next_batch() -> None:
    queue: TokenBudgetQueue[tuple[int, int]] = TokenBudgetQueue(max_batch_tokens=64, max_batch_requests=100)
    push_all(queue, [60, 4, 4, 4, 4])  # the oldest is the long one: it goes first, alone
    assert queue.next_batch() == [(0, 60)]
    assert [n for _, n in queue.next_batch()] == [4, 4, 4, 4]


def test_job_longer_than_the_budget_goes_alone() -> None:
    queue: TokenBudgetQueue[tuple[int, int]] = TokenBudgetQueue(max_batch_tokens=50, max_batch_requests=100)
    push_all(queue, [500, 1, 1])
    assert queue.next_batch() == [(0, 500)]
    assert queue.next_batch() == [(1, 1), (2, 1)]

    queue2: TokenBudgetQueue[tuple[int, int]] = TokenBudgetQueue(max_batch_tokens=50, max_batch_requests=100)
    push_all(queue2, [1, 1, 500])
    assert queue2.next_batch() == [(0, 1), (1, 1)]
    assert queue2.next_batch() == [(2, 500)]


def test_no_starvation_under_a_stream_of_better_fitting_jobs() -> None:
    """A long job waiting while short jobs keep arriving is served in the very next batch."""
    queue: TokenBudgetQueue[tuple[int, int]] = TokenBudgetQueue(max_batch_tokens=128, max_batch_requests=32)
    push_all(queue, [100], start=0)
    push_all(queue, [3] * 40, start=1)
    assert queue.next_batch() == [(0, 100)]


@pytest.mark.parametrize("seed", range(8))
def test_every_job_served_exactly_once_oldest_first(seed: int) -> None:
    """Property-style: random arrivals and lengths; every batch fits, holds the oldest waiting job,
    and every job comes out exactly once."""
    rng = random.Random(seed)
    budget = rng.choice([64, 256, 1000])
    max_requests = rng.choice([1, 3, 16, 256])
    queue: TokenBudgetQueue[tuple[int, int]] = TokenBudgetQueue(budget, max_requests)
    waiting: dict[int, int] = {}  # job id -> length, in arrival order
    served: list[int] = []
    next_id = 0
    for _ in range(300):
        for _ in range(rng.randint(0, 6)):
            length = rng.choice([rng.randint(1, 16), rng.randint(1, budget), rng.randint(budget, 2 * budget)])
            queue.push(length, (next_id, length))
            waiting[next_id] = length
            next_id += 1
        if rng.random() < 0.6:
            batch = queue.next_batch()
            if not waiting:
                assert batch == []
                continue
            check_batch(batch, budget, max_requests)
            oldest = next(iter(waiting))
            assert oldest in [j for j, _ in batch], f"oldest job {oldest} not in {batch}"
            for job_id, length in batch:
                assert waiting.pop(job_id) == length, f"job {job_id} served twice or with another length"
                served.append(job_id)
            assert len(queue) == len(waiting)
    while waiting:
        batch = queue.next_batch()
        check_batch(batch, budget, max_requests)
        assert next(iter(waiting)) in [j for j, _ in batch]
        for job_id, _ in batch:
            del waiting[job_id]
            served.append(job_id)
    assert queue.next_batch() == []
    assert sorted(served) == list(range(next_id))


def test_a_packed_budget_counts_real_tokens_not_padding() -> None:
    """One long job among short ones: padded, rows x longest must fit; packed, the sum of lengths."""
    lengths = [10, 10, 10, 10, 60]
    padded: TokenBudgetQueue[tuple[int, int]] = TokenBudgetQueue(max_batch_tokens=100, max_batch_requests=100)
    push_all(padded, lengths)
    assert [n for _, n in padded.next_batch()] == [10, 10, 10, 10]  # 5 x 60 = 300 > 100
    packed: TokenBudgetQueue[tuple[int, int]] = TokenBudgetQueue(max_batch_tokens=100, max_batch_requests=100, padded=False)
    push_all(packed, lengths)
    assert [n for _, n in packed.next_batch()] == [10, 10, 10, 10, 60]  # 100 real tokens
    assert packed.next_batch() == []


@pytest.mark.parametrize("seed", range(5))
def test_packed_batches_stay_within_the_real_token_budget(seed: int) -> None:
    rng = random.Random(seed)
    queue: TokenBudgetQueue[tuple[int, int]] = TokenBudgetQueue(max_batch_tokens=256, max_batch_requests=64, padded=False)
    push_all(queue, [rng.randint(1, 128) for _ in range(200)])
    served = 0
    while batch := queue.next_batch():
        assert len(batch) == 1 or sum(n for _, n in batch) <= 256
        served += len(batch)
    assert served == 200


def test_discard_removes_only_the_given_payloads() -> None:
    q: TokenBudgetQueue[list[str]] = TokenBudgetQueue(max_batch_tokens=1000, max_batch_requests=100)
    gone = [["gone", str(i)] for i in range(3)]
    kept = [["kept", str(i)] for i in range(3)]
    for a, b in zip(gone, kept, strict=True):
        q.push(5, a)
        q.push(5, b)
    assert q.discard([*gone, ["gone", "0"]]) == 3  # by identity: an equal list that was never queued is not removed
    assert len(q) == 3 and q.next_batch() == kept
    assert q.discard(gone) == 0
