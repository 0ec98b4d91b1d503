"""One object a target's build takes: what was decided before the heavy work, and where it writes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from bei.buildsteps.plan import BuildPlan
from bei.checkpoint import Checkpoint
from bei.config import BeiConfig
from bei.engine.manifest import Manifest
from bei.modeling.spec import ModelSpec
from bei.progress import Progress
from bei.text.tokenizer import TokenizerRuntime


@dataclass(frozen=True)
class BuildResult:
    engine_dir: Path
    manifest: Manifest


@dataclass
class BuildContext:
    """The config, its checkpoint and spec, the plan, and where the engine goes. `spec.max_seq_len`
    is already the plan's input cap."""

    config: BeiConfig
    checkpoint: Checkpoint
    spec: ModelSpec
    plan: BuildPlan
    engines_root: Path
    config_dir: Path
    progress: Progress
    started: float = field(default_factory=time.perf_counter)

    @property
    def engine_dir(self) -> Path:
        return self.engines_root / self.config.name

    @cached_property
    def tokenizer(self) -> TokenizerRuntime:
        return TokenizerRuntime(self.checkpoint.path / "tokenizer.json", self.spec.max_seq_len, chat_template=self.spec.chat_template)

    def seconds(self) -> float:
        return time.perf_counter() - self.started
