"""The targets bei knows, in the order `--target auto` asks them. A new target is a folder under
`bei/targets/` exporting a `Target`, and one line here (or `register(...)` at run time, as the
tests do for a fake target)."""

from __future__ import annotations

from bei.buildsteps.plan import TargetChoice
from bei.engine.manifest import Manifest
from bei.errors import ConfigError, EngineError
from bei.hardware import Host, detect_host
from bei.targets import onnxruntime, tensorrt, torch
from bei.targets.base import Target

# asked in this order by `auto`: the first whose `auto` gives a reason is chosen
TARGETS: list[Target] = [tensorrt.TARGET, torch.TARGET, onnxruntime.TARGET]


def register(target: Target, *, first: bool = False) -> None:
    """Add a target (or replace the one of the same name); `first`: `auto` asks it before the others."""
    unregister(target.name)
    if first:
        TARGETS.insert(0, target)
    else:
        TARGETS.append(target)


def unregister(name: str) -> None:
    TARGETS[:] = [t for t in TARGETS if t.name != name]


def names() -> list[str]:
    """What `--target` accepts: auto, then each target's name and aliases."""
    return ["auto", *(n for t in TARGETS for n in (t.name, *t.aliases))]


def get(name: str) -> Target:
    """The target called `name` (or one of its aliases)."""
    for target in TARGETS:
        if name == target.name or name in target.aliases:
            return target
    raise ConfigError(f"--target: {name!r} is not one of {', '.join(names())}")


def choose_target(requested: str, host: Host, *, dry_run: bool = False, cpu_precision: str = "fp32") -> TargetChoice:
    """`auto` takes the first target (in `TARGETS` order) that would pick itself on `host` for the
    config's `cpu_precision`; a named target must be able to build here, or (with `dry_run`) be one
    that plans anywhere."""
    if requested == "auto":
        for target in TARGETS:
            reason = target.auto(host, cpu_precision)
            if reason is not None:
                return TargetChoice(target.name, reason)
        raise EngineError(f"no target builds on this machine; known targets: {', '.join(t.name for t in TARGETS)}")
    target = get(requested)
    missing = target.availability(host)
    if missing is None:
        where = (f", on {host.gpu}" if host.gpu else ", on the CPU (no CUDA GPU here)") if target.uses_gpu else ""
        return TargetChoice(target.name, f"asked for with --target{where}")
    if dry_run and target.plannable:
        return TargetChoice(target.name, f"asked for with --target; a plan only: this machine lacks {missing}")
    others = [t.name for t in TARGETS if t is not target and t.availability(host) is None]
    raise EngineError(
        f"--target {requested} needs {missing}, which this machine lacks; build on the machine you will serve on"
        + (f", or choose a target that builds here: {', '.join(others)}" if others else "")
    )


def check_compatible(manifest: Manifest, host: Host | None = None) -> None:
    """Raise an EngineError saying why this machine cannot run the engine."""
    names_known = [t.name for t in TARGETS]
    if manifest.target.name not in names_known:
        raise EngineError(f"engine {manifest.name!r} has unknown target {manifest.target.name!r}; known: {', '.join(names_known)}")
    target = get(manifest.target.name)
    target.check_host(manifest, host or detect_host(gpu=target.uses_gpu))
