"""/tokenize: the engine's tokenizer, as TEI answers it (`id`, `text`, `special`, `start`, `stop`)."""

from __future__ import annotations

from typing import Any

from bei.api.embeddings import prompt_text
from bei.api.http import Timing
from bei.api.schemas import TokenizeRequest
from bei.api.scoring import check_count
from bei.inference import InferenceService


async def tokenize(service: InferenceService, request: TokenizeRequest, timing: Timing) -> Any:
    """Each text tokenized untruncated, on the tokenizer threads; a text over the characters the
    model's limit can hold (`TokenizerRuntime.max_chars`) is refused (422), so the answer is bounded."""
    texts = [request.inputs] if isinstance(request.inputs, str) else list(request.inputs)
    check_count(len(texts), service)
    prompt = prompt_text(service, request.prompt_name) if request.prompt_name else None
    tokenizer = service.tokenizer
    fulls = [(prompt or "") + text for text in texts]
    for full in fulls:
        tokenizer.bound(full, truncate=False)

    def work() -> list[list[dict[str, Any]]]:
        answers = []
        for full in fulls:
            enc = tokenizer.encode_plain(full, add_special_tokens=request.add_special_tokens)
            timing.compute_tokens += len(enc.ids)
            answers.append(
                [
                    {
                        "id": token_id,
                        "text": full[start:stop] if not special else token,
                        "special": bool(special),
                        "start": start,
                        "stop": stop,
                    }
                    for token_id, token, special, (start, stop) in zip(
                        enc.ids, enc.tokens, enc.special_tokens_mask, enc.offsets, strict=True
                    )
                ]
            )
        return answers

    return await service.on_tokenizer_thread(work)
