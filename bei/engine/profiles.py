"""TensorRT optimization profiles from the token budget.

One profile (batch 1..max_batch, sequence 1..max_seq) lets TensorRT size its activations for
max_batch x max_seq tokens, which can be many times the budget of one call (`max_num_tokens`).
Profiles are therefore split into sequence-length buckets (powers of two); in each bucket the
largest batch is what the budget allows at the bucket's shortest length, so any batch the
batcher forms (rows x width <= max_num_tokens) fits a profile, and no profile allocates more
than twice the budget.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from bei.errors import EngineError


@dataclass(frozen=True)
class Profile:
    batch: tuple[int, int, int]  # min, opt, max
    seq: tuple[int, int, int]

    @property
    def max_tokens(self) -> int:
        return self.batch[2] * self.seq[2]

    def fits(self, rows: int, width: int) -> bool:
        return self.batch[0] <= rows <= self.batch[2] and self.seq[0] <= width <= self.seq[2]

    def as_dict(self) -> dict[str, list[int]]:
        return {"batch": list(self.batch), "seq": list(self.seq)}


def _profile(seq_min: int, seq_max: int, max_num_tokens: int, max_batch_size: int) -> Profile:
    batch_max = max(1, min(max_batch_size, max_num_tokens // seq_min))
    seq_opt = min(seq_max, max(seq_min, (seq_min + seq_max) // 2))
    batch_opt = max(1, min(batch_max, max_num_tokens // seq_opt // 2 or 1))
    return Profile(batch=(1, batch_opt, batch_max), seq=(seq_min, seq_opt, seq_max))


def derive_profiles(max_num_tokens: int, max_batch_size: int, max_seq_len: int, min_bucket: int = 64) -> list[Profile]:
    """Profiles covering every (rows, width) with rows <= max_batch_size, width <= max_seq_len and
    rows x width <= max_num_tokens."""
    if max_seq_len < 1 or max_num_tokens < 1 or max_batch_size < 1:
        raise EngineError("max_num_tokens, max_batch_size and max_seq_len must be positive")
    if max_seq_len > max_num_tokens:
        raise EngineError(
            f"trt_llm.build.max_num_tokens: {max_num_tokens} is below the model's max length {max_seq_len}; "
            "one input must fit one engine call"
        )
    if max_batch_size * max_seq_len <= 2 * max_num_tokens:
        return [_profile(1, max_seq_len, max_num_tokens, max_batch_size)]  # one profile wastes little
    bounds = [0]
    edge = min_bucket
    while edge < max_seq_len:
        bounds.append(edge)
        edge *= 2
    bounds.append(max_seq_len)
    return [_profile(lo + 1, hi, max_num_tokens, max_batch_size) for lo, hi in itertools.pairwise(bounds)]


def select_profile(profiles: list[Profile], rows: int, width: int) -> int:
    """Index of the first profile that fits a batch of `rows` x `width`."""
    for index, profile in enumerate(profiles):
        if profile.fits(rows, width):
            return index
    raise EngineError(f"no optimization profile fits a batch of {rows} x {width} tokens")


Shape = tuple[int, ...]


def profile_shapes(profile: Profile, input_names: list[str]) -> dict[str, tuple[Shape, Shape, Shape]]:
    """min / opt / max shapes of every graph input under `profile` ([batch, seq], or [batch])."""
    shapes: dict[str, tuple[Shape, Shape, Shape]] = {}
    for name in input_names:
        if name == "prompt_length":
            shapes[name] = ((profile.batch[0],), (profile.batch[1],), (profile.batch[2],))
        else:
            shapes[name] = tuple((b, s) for b, s in zip(profile.batch, profile.seq, strict=True))  # type: ignore[assignment]
    return shapes
