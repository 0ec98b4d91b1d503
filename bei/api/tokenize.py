"""/tokenize: the engine's tokenizer, as TEI answers it (`id`, `text`, `special`, `start`, `stop`)."""

from __future__ import annotations

from typing import Any

from bei.api.embeddings import prompt_text
from bei.api.http import Timing
from bei.api.schemas import TokenizeRequest
from bei.api.scoring import check_count
from bei.inference import InferenceService


async def tokenize(service: InferenceService, request: TokenizeRequest, timing: Timing) -> Any:
    texts = [request.inputs] if isinstance(request.inputs, str) else list(request.inputs)
    check_count(len(texts), service)
    prompt = prompt_text(service, request.prompt_name) if request.prompt_name else None
    answers = []
    for text in texts:
        full = (prompt or "") + text
        enc = service.tokenizer.encode_plain(full, add_special_tokens=request.add_special_tokens)
        timing.compute_tokens += len(enc.ids)
        answers.append(
            [
                {"id": token_id, "text": full[start:stop] if not special else token, "special": bool(special), "start": start, "stop": stop}
                for token_id, token, special, (start, stop) in zip(enc.ids, enc.tokens, enc.special_tokens_mask, enc.offsets, strict=True)
            ]
        )
    return answers
