"""How many replicas `bei serve --ray` runs: a fixed number (`--replicas`), or Ray Serve's autoscaling between
`--min-replicas` and `--max-replicas`, aiming at `--target-ongoing-requests` per replica.

Checked here, before Ray starts, with errors naming the flags; `deployment_options` is what Ray Serve's
`serve.deployment` takes (`num_replicas`, or `autoscaling_config`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from bei.errors import ConfigError

FLAGS = {
    "replicas": "--replicas",
    "min_replicas": "--min-replicas",
    "max_replicas": "--max-replicas",
    "target_ongoing_requests": "--target-ongoing-requests",
}


class Scaling(BaseModel):
    """Replicas of the deployment. Autoscaling when any of min/max/target is given (then --max-replicas is
    required; --min-replicas defaults to 1, 0 scales to zero; --replicas, if given, is how many start)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    replicas: int | None = Field(None, ge=1, description="fixed replicas; with autoscaling, the replicas started first")
    min_replicas: int | None = Field(None, ge=0, description="autoscaling: fewest replicas (0: scale to zero when idle)")
    max_replicas: int | None = Field(None, ge=1, description="autoscaling: most replicas")
    target_ongoing_requests: float | None = Field(None, gt=0, description="autoscaling: requests in flight per replica to aim at")

    @property
    def autoscaling(self) -> bool:
        return any(v is not None for v in (self.min_replicas, self.max_replicas, self.target_ongoing_requests))

    @classmethod
    def of(cls, values: dict[str, Any], max_ongoing_requests: int) -> Scaling:
        """Checked values (None: not given); a ConfigError naming the flags at fault.
        `max_ongoing_requests` (--max-concurrent-requests) bounds the target: a replica never holds more."""
        try:
            scaling = cls.model_validate({k: v for k, v in values.items() if v is not None})
        except PydanticValidationError as err:
            problems = [f"{FLAGS.get(str(e['loc'][0]), e['loc'][0])}: {e['input']!r}: {e['msg']}" for e in err.errors()]
            raise ConfigError("; ".join(problems)) from None
        scaling.check(max_ongoing_requests)
        return scaling

    def check(self, max_ongoing_requests: int) -> None:
        if not self.autoscaling:
            return
        if self.max_replicas is None:
            raise ConfigError("autoscaling (--min-replicas / --target-ongoing-requests) needs --max-replicas")
        low = 1 if self.min_replicas is None else self.min_replicas
        if low > self.max_replicas:
            raise ConfigError(f"--min-replicas ({low}) is more than --max-replicas ({self.max_replicas})")
        if self.replicas is not None and not low <= self.replicas <= self.max_replicas:
            raise ConfigError(
                f"--replicas ({self.replicas}), the replicas autoscaling starts with, is outside "
                f"--min-replicas ({low}) .. --max-replicas ({self.max_replicas})"
            )
        if self.target_ongoing_requests is not None and self.target_ongoing_requests > max_ongoing_requests:
            raise ConfigError(
                f"--target-ongoing-requests ({self.target_ongoing_requests:g}) is more than --max-concurrent-requests "
                f"({max_ongoing_requests}), the most requests a replica takes"
            )

    def deployment_options(self) -> dict[str, Any]:
        """`serve.deployment(**options)`: num_replicas, or an autoscaling_config (Ray's defaults for what is not given)."""
        if not self.autoscaling:
            return {"num_replicas": self.replicas or 1}
        config: dict[str, Any] = {"min_replicas": 1 if self.min_replicas is None else self.min_replicas, "max_replicas": self.max_replicas}
        if self.replicas is not None:
            config["initial_replicas"] = self.replicas
        if self.target_ongoing_requests is not None:
            config["target_ongoing_requests"] = self.target_ongoing_requests
        return {"autoscaling_config": config}
