"""The token-budget queue: plain state, no threads, no model.

Waiting jobs are grouped into engine calls by a token budget and a request cap. The budget counts
what the engine computes: for a backend that pads, padded positions (rows x the longest row); for
one that packs (`padded=False`), real tokens (the sum of the rows' lengths). Jobs are sorted by
length so that a batch pads to neighbours of similar length, never to the longest input of the
whole queue; the batch always holds the oldest waiting job, so no job waits behind an endless
stream of better-fitting ones.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(order=True)
class Job(Generic[T]):
    """One input waiting for the engine. `payload` is whatever the batcher needs back."""

    tokens: int
    seq: int
    payload: T = field(compare=False)


class TokenBudgetQueue(Generic[T]):
    def __init__(self, max_batch_tokens: int, max_batch_requests: int, *, padded: bool = True) -> None:
        if max_batch_tokens < 1 or max_batch_requests < 1:
            raise ValueError("max_batch_tokens and max_batch_requests must be positive")
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_requests = max_batch_requests
        self.padded = padded
        self._jobs: list[Job[T]] = []
        self._counter = itertools.count()

    def __len__(self) -> int:
        return len(self._jobs)

    def push(self, tokens: int, payload: T) -> None:
        self._jobs.append(Job(tokens=tokens, seq=next(self._counter), payload=payload))

    def discard(self, payloads: list[T]) -> int:
        """Remove the jobs of these payloads (a request whose client went away), in one pass; returns how many."""
        gone = {id(payload) for payload in payloads}
        kept = [job for job in self._jobs if id(job.payload) not in gone]
        removed = len(self._jobs) - len(kept)
        self._jobs = kept
        return removed

    def _fits(self, count: int, longest: int, total: int) -> bool:
        """Whether `count` jobs, the longest `longest` tokens and `total` tokens in all, fit one call."""
        tokens = count * longest if self.padded else total
        return count <= self.max_batch_requests and tokens <= self.max_batch_tokens

    def next_batch(self) -> list[T]:
        """Remove and return the next engine call's payloads, shortest first; [] when empty.

        Jobs sorted by length are cut greedily into budget-sized groups; the group holding the
        oldest job is the next batch. A job longer than the budget goes alone.
        """
        if not self._jobs:
            return []
        oldest = min(self._jobs, key=lambda job: job.seq)
        ordered = sorted(self._jobs)
        group: list[Job[T]] = []
        total = 0
        for job in ordered:  # ascending: `job` is the longest of the group it joins
            if group and not self._fits(len(group) + 1, job.tokens, total + job.tokens):
                if any(j is oldest for j in group):
                    break
                group, total = [], 0
            group.append(job)
            total += job.tokens
        taken = {id(job) for job in group}
        self._jobs = [job for job in self._jobs if id(job) not in taken]
        return [job.payload for job in group]
