"""Stage-by-stage progress of long operations (builds), printed to stderr."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


class Progress:
    """`with progress.stage("export"):` prints `[3/6] export ...` and then the time it took."""

    def __init__(self, stages: list[str], stream: TextIO | None = None, enabled: bool = True) -> None:
        self.stages = stages
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.timings: dict[str, float] = {}

    def note(self, message: str) -> None:
        if self.enabled:
            print(f"      {message}", file=self.stream, flush=True)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        index = self.stages.index(name) + 1
        if self.enabled:
            print(f"[{index}/{len(self.stages)}] {name} ...", file=self.stream, flush=True)
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            if self.enabled:
                print(f"[{index}/{len(self.stages)}] {name} failed", file=self.stream, flush=True)
            raise
        self.timings[name] = time.perf_counter() - start
        if self.enabled:
            print(f"[{index}/{len(self.stages)}] {name} done in {self.timings[name]:.1f}s", file=self.stream, flush=True)
