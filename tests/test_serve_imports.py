"""Serving a CPU engine loads neither torch nor transformers (hundreds of MiB and seconds of start-up)."""

from __future__ import annotations

import subprocess
import sys

from tests.servers import BuiltEngine

PROBE = """
import sys
from pathlib import Path
from bei.api.app import state_for_engines
from bei.targets.loading import load_engine
from bei.settings import ServeSettings
import bei.serve
folder = Path(sys.argv[1])
state_for_engines([folder], ServeSettings())
engine = load_engine(folder)
print(sorted(m for m in ("torch", "transformers", "sentence_transformers") if m in sys.modules))
"""


def test_serving_a_cpu_engine_imports_no_torch(minilm_build: BuiltEngine) -> None:
    result = subprocess.run([sys.executable, "-c", PROBE, str(minilm_build.engine_dir)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
