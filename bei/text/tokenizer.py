"""Tokenization with the `tokenizers` library: single texts, pairs, token ids; truncation both ways."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tokenizers import Encoding, Tokenizer

from bei.errors import EmptyInputError, InputTooLongError, ValidationError
from bei.text.chat_template import ChatTemplate, read_special_tokens, truncate_keeping_suffix

Direction = Literal["right", "left"]
TextInput = str | tuple[str, str] | list[int]

# A token is seldom over 8 characters; one over CHARS_PER_TOKEN is rare even in code or URLs. A text of
# more than max_length * CHARS_PER_TOKEN characters is cut to that before it is tokenized (truncate on),
# or refused (truncate off): the tokenizer holds the GIL, and megabytes of text would stall the server.
CHARS_PER_TOKEN = 16


@dataclass(frozen=True)
class Encoded:
    """One input as the engine sees it."""

    ids: list[int]
    type_ids: list[int]
    offsets: list[tuple[int, int]]
    special: list[int]  # 1 where the tokenizer added a special token ([CLS], </s>, ...)
    prompt_length: int = 0

    def __len__(self) -> int:
        return len(self.ids)


class TokenizerRuntime:
    """Three `tokenizers.Tokenizer` instances from one tokenizer.json: untruncated, truncate right, left.

    Separate instances because truncation is tokenizer state and encoding runs on several threads.

    With a `chat_template` (a causal reranker / classifier whose checkpoint defines one), texts and pairs
    are rendered through it as sentence-transformers' CrossEncoder does (see `bei.text.chat_template`);
    special tokens for the template come from tokenizer_config.json next to `tokenizer_file`.
    """

    def __init__(self, tokenizer_file: Path, max_length: int, chat_template: str | None = None) -> None:
        self.max_length = max_length
        self.max_chars = max_length * CHARS_PER_TOKEN
        self.chat_template: ChatTemplate | None = None
        if chat_template:
            self.chat_template = ChatTemplate(chat_template, read_special_tokens(Path(tokenizer_file).parent))
        self._plain = Tokenizer.from_file(str(tokenizer_file))
        self._plain.no_truncation()
        self._plain.no_padding()
        self._truncating: dict[str, Tokenizer] = {}
        for direction in ("right", "left"):
            tok = Tokenizer.from_file(str(tokenizer_file))
            tok.no_padding()
            tok.enable_truncation(max_length, direction=direction)
            self._truncating[direction] = tok
        self.pad_id = self._pad_id(Path(tokenizer_file).parent)

    def _pad_id(self, folder: Path) -> int:
        """The id rows are padded with: tokenizer.json's padding, else the `pad_token` of the
        tokenizer's JSON files (what transformers pads with), else a common pad token. It matters
        beyond the attention mask: a causal sequence classifier takes each row's last token that is
        not `pad_token_id` (transformers' rule), so right-padding with another id picks a pad."""
        padding = self._plain.padding
        if padding and padding.get("pad_id") is not None:
            return int(padding["pad_id"])
        try:
            named = read_special_tokens(folder).get("pad_token")
        except (OSError, ValueError):
            named = None
        token_id = self._plain.token_to_id(named) if named else None
        if token_id is not None:
            return token_id
        for token in ("[PAD]", "<pad>", "<|endoftext|>", "</s>", "<eos>"):
            token_id = self._plain.token_to_id(token)
            if token_id is not None:
                return token_id
        return 0

    def token_to_id(self, token: str) -> int | None:
        return self._plain.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._plain.id_to_token(token_id)

    def decode_tokens(self, tokens: list[str]) -> str:
        """Token strings back to text, as transformers' `convert_tokens_to_string`."""
        decoder = self._plain.decoder
        return decoder.decode(tokens) if decoder is not None else " ".join(tokens)

    @functools.cached_property
    def frame(self) -> tuple[list[int], list[int]]:
        """The special token ids the tokenizer puts before and after a text ([CLS] and [SEP], <s> and </s>)."""
        enc = self._plain.encode("a", add_special_tokens=True)
        special = list(enc.special_tokens_mask)
        first = special.index(0) if 0 in special else len(special)
        last = len(special) - special[::-1].index(0) if 0 in special else len(special)
        return list(enc.ids[:first]), list(enc.ids[last:])

    @property
    def continuing_subword_prefix(self) -> str | None:
        return getattr(self._plain.model, "continuing_subword_prefix", None)

    @property
    def unk_id(self) -> int | None:
        token = getattr(self._plain.model, "unk_token", None)
        return self._plain.token_to_id(token) if token else None

    def encode_plain(self, text: str, add_special_tokens: bool = True) -> Encoding:
        """The raw `tokenizers` encoding, untruncated: for /tokenize."""
        return self._plain.encode(text, add_special_tokens=add_special_tokens)

    def count_prompt_tokens(self, prompt: str) -> int:
        """Tokens a prompt prefix contributes, as sentence-transformers counts them (no trailing special)."""
        enc = self._plain.encode(prompt, add_special_tokens=True)
        n = len(enc.ids)
        if n and enc.special_tokens_mask[-1]:
            n -= 1
        return n

    def encode(
        self,
        item: TextInput,
        *,
        truncate: bool = False,
        direction: Direction = "right",
        prompt: str | None = None,
    ) -> Encoded:
        if isinstance(item, list):
            return self._from_ids(item, truncate=truncate, direction=direction)
        if isinstance(item, tuple):
            if not item[0] and not item[1]:
                raise EmptyInputError("input is empty")
        elif not item:
            raise EmptyInputError("input is empty")
        item = self.bound(item, truncate=truncate, direction=direction)
        if self.chat_template is not None:
            return self._encode_chat(self.chat_template, item, truncate=truncate, direction=direction)
        prompt_length = 0
        if prompt:
            prompt_length = self.count_prompt_tokens(prompt)
            item = prompt + item if isinstance(item, str) else (prompt + item[0], item[1])
        enc = self._encode(self._plain, item)
        if len(enc.ids) > self.max_length:
            if not truncate:
                raise InputTooLongError(f"input of {len(enc.ids)} tokens is longer than the model's limit of {self.max_length} tokens")
            enc = self._encode(self._truncating[direction], item)
        return Encoded(
            ids=list(enc.ids),
            type_ids=list(enc.type_ids),
            offsets=list(enc.offsets),
            special=list(enc.special_tokens_mask),
            prompt_length=prompt_length,
        )

    def bound(self, item: str | tuple[str, str], *, truncate: bool, direction: Direction = "right") -> str | tuple[str, str]:
        """Each text of `item` cut to `max_chars` characters (truncate on: the tokens kept are the same
        unless the cut text has fewer than `max_length` tokens), or refused over it (truncate off)."""
        texts = (item,) if isinstance(item, str) else item
        longest = max(len(text) for text in texts)
        if longest <= self.max_chars:
            return item
        if not truncate:
            raise InputTooLongError(
                f"input of {longest} characters is longer than the model's limit of {self.max_length} tokens can hold "
                f"(at most {self.max_chars} characters are tokenized)"  # the route adds what the client can do
            )
        cut = [text[: self.max_chars] if direction == "right" else text[-self.max_chars :] for text in texts]
        return cut[0] if isinstance(item, str) else (cut[0], cut[1])

    def _chat_ids(self, text: str) -> list[int]:
        return list(self._plain.encode(text, add_special_tokens=False).ids)

    def _encode_chat(self, template: ChatTemplate, item: str | tuple[str, str], *, truncate: bool, direction: Direction) -> Encoded:
        """Render through the chat template, tokenize without special tokens (they are in the text), and
        truncate as sentence-transformers does: cut to the limit, then the template suffix written back."""
        try:
            text = template.render(item)
        except Exception as err:  # noqa: BLE001 - a template that cannot render this input
            raise ValidationError(f"the model's chat template cannot render this input: {err}") from None
        enc = self._plain.encode(text, add_special_tokens=False)
        ids = list(enc.ids)
        if len(ids) > self.max_length and not truncate:
            raise InputTooLongError(
                f"input of {len(ids)} tokens (with the model's chat template) is longer than the model's limit of {self.max_length} tokens"
            )
        if len(ids) >= self.max_length:
            ids = truncate_keeping_suffix(ids, template.suffix_ids(item, self._chat_ids), self.max_length, direction)
            return Encoded(ids=ids, type_ids=[0] * len(ids), offsets=[(0, 0)] * len(ids), special=[0] * len(ids))
        return Encoded(
            ids=ids,
            type_ids=[0] * len(ids),
            offsets=list(enc.offsets),
            special=list(enc.special_tokens_mask),
        )

    @staticmethod
    def _encode(tok: Tokenizer, item: str | tuple[str, str]) -> Encoding:
        if isinstance(item, tuple):
            return tok.encode(item[0], item[1], add_special_tokens=True)
        return tok.encode(item, add_special_tokens=True)

    def _from_ids(self, ids: list[int], *, truncate: bool, direction: Direction) -> Encoded:
        if not ids:
            raise EmptyInputError("input is empty")
        if len(ids) > self.max_length:  # cut (or refused) before the vocabulary check: bounded work
            if not truncate:
                raise InputTooLongError(f"input of {len(ids)} tokens is longer than the model's limit of {self.max_length} tokens")
            ids = ids[: self.max_length] if direction == "right" else ids[-self.max_length :]
        vocab = self._plain.get_vocab_size(with_added_tokens=True)
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ValidationError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        return Encoded(ids=list(ids), type_ids=[0] * len(ids), offsets=[(0, 0)] * len(ids), special=[0] * len(ids))
