"""What a build will make, decided before any heavy work: target, precision, profiles, the layers
quantization touches and a memory estimate. `bei build --dry-run` prints it; no GPU is needed."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from bei.engine.profiles import Profile
from bei.kinds import Precision


@dataclass(frozen=True)
class TargetChoice:
    name: str
    reason: str


@dataclass(frozen=True)
class BuildPlan:
    target: str
    target_reason: str
    precision: Precision
    gpu: str | None
    compute_capability: str | None
    max_input_tokens: int
    max_num_tokens: int
    max_batch_size: int
    profiles: list[Profile] = field(default_factory=list)
    quantized_layers: list[str] = field(default_factory=list)
    parameters: int = 0
    weights_bytes: int = 0
    activation_bytes: int = 0
    notes: list[str] = field(default_factory=list)
    cpu_features: list[str] = field(default_factory=list)  # CPU ISA features the engine will need

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["precision"] = self.precision.value
        data["profiles"] = [p.as_dict() for p in self.profiles]
        return data

    def render(self) -> str:
        gib = 1024**3
        lines = [
            f"target:     {self.target} ({self.target_reason})",
            f"precision:  {self.precision.value}",
            f"gpu:        {self.gpu or 'none'}" + (f" (compute capability {self.compute_capability})" if self.compute_capability else ""),
            f"max input:  {self.max_input_tokens} tokens; budget {self.max_num_tokens} tokens / call; batch <= {self.max_batch_size}",
        ]
        for i, p in enumerate(self.profiles):
            lines.append(f"profile {i}:  batch {p.batch[0]}/{p.batch[1]}/{p.batch[2]}, seq {p.seq[0]}/{p.seq[1]}/{p.seq[2]} (min/opt/max)")
        if self.quantized_layers:
            lines.append(f"quantized:  {len(self.quantized_layers)} Linear layers, e.g. {', '.join(self.quantized_layers[:3])}")
        lines.append(
            f"memory:     ~{(self.weights_bytes + self.activation_bytes) / gib:.2f} GiB "
            f"(weights {self.weights_bytes / gib:.2f} GiB for {self.parameters / 1e6:.1f}M parameters, "
            f"activations ~{self.activation_bytes / gib:.2f} GiB at the largest profile)"
        )
        if self.cpu_features:
            lines.append(f"cpu needs:  {', '.join(self.cpu_features)}")
        lines += [f"note:       {n}" for n in self.notes]
        return "\n".join(lines)
