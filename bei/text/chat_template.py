"""Chat-template rendering of cross-encoder inputs, token for token as sentence-transformers 6.2 does it.

sentence-transformers' `CrossEncoder` (its `Transformer` module) switches a checkpoint to the "message"
modality as soon as its tokenizer has a chat template (`chat_template.jinja`, which wins, else
`chat_template` in tokenizer_config.json). Every input then goes through the template:

* a (query, document) pair becomes two messages, roles "query" and "document"
  (`InputFormatter.pair_to_messages`); a single text becomes one "user" message (`to_message`);
* messages are "flat" (`content` is the string) unless the template text looks structured
  (`content[0]`, `.type`, ...), then `content` is `[{"type": "text", "text": ...}]`;
* the template is rendered by transformers' `render_jinja_template` with `add_generation_prompt=False`
  and the tokenizer's named special tokens (`bos_token`, ...) as variables, and the text is tokenized
  with `add_special_tokens=False` (`apply_chat_template`);
* truncation (ST passes `truncation="longest_first"`) cuts the rendered ids to the limit, then the
  template's suffix (`_restore_chat_template_suffix`) is written over the last tokens: the common token
  tail of two renders whose non-system content is "0" and "1 2 3 4". So a truncated input keeps the
  template head and tail (the assistant prefix the score is read after) and loses content.

A template that drops the query or the document (a chat model's stock template) makes ST refuse pairs;
`pair_roles_failure` runs ST's probe so that the build can tell.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

PAIR_ROLES = ("query", "document")
# sentence_transformers.base.modality.PAIR_ROLE_PROBES: a baseline pair, then one per role varying only that role
PAIR_ROLE_PROBES = (("alpha", "bravo"), ("charlie", "bravo"), ("alpha", "foxtrot"))
# Transformer._chat_template_suffix_ids: two fillers that tokenize differently
SUFFIX_FILLERS = ("0", "1 2 3 4")
# PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES: what `special_tokens_map` holds, passed to the template
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# InputFormatter._infer_format: template text that reads content as a list of typed parts
_STRUCTURED_PATTERNS = ("content[0]", ".type", "'type'", '"type"', "item.type", "message.content[")

CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"

PairOrText = str | tuple[str, str]


def read_chat_template(folder: Path) -> str | None:
    """The template transformers' tokenizer loading gives a checkpoint, None if it has none.

    `chat_template.jinja` (and `additional_chat_templates/*.jinja`) take priority over `chat_template` in
    tokenizer_config.json, which is a string or a list of {name, template}. Of several named templates
    the one used without tools is "default".
    """
    templates: dict[str, str] = {}
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        templates["default"] = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    extra_dir = folder / CHAT_TEMPLATE_DIR
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            templates[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    if not templates:
        config_file = folder / "tokenizer_config.json"
        if not config_file.is_file():
            return None
        raw = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(raw, str):
            return raw or None
        if isinstance(raw, list):
            templates = {str(t["name"]): str(t["template"]) for t in raw if isinstance(t, dict) and "name" in t}
        else:
            return None
    return templates.get("default")


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_special_tokens(folder: Path) -> dict[str, str]:
    """The tokenizer's `special_tokens_map` (named special tokens as strings) from its JSON files.

    tokenizer_config.json holds them (strings or AddedToken dicts); a legacy special_tokens_map.json is
    merged over them when the config has no `added_tokens_decoder`, as transformers 5 loads them.
    Model-specific names (`extra_special_tokens` as a dict) are special tokens too.
    """
    config: dict[str, Any] = {}
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
    merged = dict(config)
    legacy = folder / "special_tokens_map.json"
    if "added_tokens_decoder" not in config and legacy.is_file():
        merged.update(json.loads(legacy.read_text(encoding="utf-8")))
    names = list(SPECIAL_TOKEN_NAMES)
    extra = merged.get("extra_special_tokens")
    if isinstance(extra, dict):
        merged = {**merged, **extra}
        names += [str(k) for k in extra if k not in names]
    tokens: dict[str, str] = {}
    for name in names:
        content = _token_content(merged.get(name))
        if content is not None:
            tokens[name] = content
    return tokens


def message_format(template: str) -> str:
    """ "flat" or "structured", as sentence-transformers infers it from the template text."""
    return "structured" if any(p in template for p in _STRUCTURED_PATTERNS) else "flat"


class ChatTemplate:
    """One checkpoint's chat template, rendering cross-encoder inputs as sentence-transformers does."""

    def __init__(self, template: str, special_tokens: dict[str, str] | None = None) -> None:
        # transformers' own renderer (same sandbox, filters, globals and input sanitizing): imported here, so
        # that engines without a template never pay for importing transformers
        from transformers.utils.chat_template_utils import render_jinja_template

        self.template = template
        self.special_tokens = dict(special_tokens or {})
        self.format = message_format(template)
        self._render_jinja: Any = render_jinja_template
        self._suffixes: dict[tuple[str, ...], list[int]] = {}
        self._lock = threading.Lock()

    # --- messages -----------------------------------------------------------------------------
    def _message(self, role: str, text: str) -> dict[str, Any]:
        if self.format == "flat":
            return {"role": role, "content": text}
        return {"role": role, "content": [{"type": "text", "text": text}]}

    def messages(self, item: PairOrText) -> list[dict[str, Any]]:
        """A pair -> "query" and "document" messages; a text -> one "user" message."""
        if isinstance(item, tuple):
            return [self._message(role, text) for role, text in zip(PAIR_ROLES, item, strict=True)]
        return [self._message("user", item)]

    def render_messages(self, messages: list[dict[str, Any]]) -> str:
        rendered, _ = self._render_jinja(
            conversations=[messages],
            chat_template=self.template,
            add_generation_prompt=False,
            **self.special_tokens,
        )
        return str(rendered[0])

    def render(self, item: PairOrText) -> str:
        return self.render_messages(self.messages(item))

    # --- checks -------------------------------------------------------------------------------
    def pair_roles_failure(self) -> str | None:
        """Why the template cannot carry a (query, document) pair, None when it can (ST's probe)."""
        try:
            base, *varied = [self.render(pair) for pair in PAIR_ROLE_PROBES]
        except Exception as err:  # noqa: BLE001 - any template failure is the answer
            return f"it raised {type(err).__name__}: {err}"
        dropped = [role for role, render in zip(PAIR_ROLES, varied, strict=True) if render == base]
        if dropped:
            return f"the {' and '.join(repr(r) for r in dropped)} content does not reach the rendered prompt"
        return None

    # --- truncation ---------------------------------------------------------------------------
    def suffix_ids(self, item: PairOrText, tokenize: Callable[[str], list[int]]) -> list[int]:
        """The template's token tail after the last content, for this kind of input (cached per role layout)."""
        skeleton_roles = tuple(m["role"] for m in self.messages(item))
        with self._lock:
            cached = self._suffixes.get(skeleton_roles)
        if cached is not None:
            return cached
        suffix: list[int] = []
        try:
            first, second = (
                tokenize(self.render_messages([self._message(role, filler) for role in skeleton_roles])) for filler in SUFFIX_FILLERS
            )
            count = 0
            for left, right in zip(reversed(first), reversed(second), strict=False):
                if left != right:
                    break
                count += 1
            # renders that never diverge have no variable content: their common run is not a suffix
            if 0 < count < min(len(first), len(second)):
                suffix = first[len(first) - count :]
        except Exception:  # noqa: BLE001 - as in ST, a failed derivation only means no suffix is restored
            suffix = []
        with self._lock:
            self._suffixes[skeleton_roles] = suffix
        return suffix


def truncate_keeping_suffix(ids: list[int], suffix: list[int], max_length: int, direction: str) -> list[int]:
    """Rendered ids cut to `max_length` as the tokenizer cuts them, the template suffix written back over the
    last tokens. As in ST, every row that reaches `max_length` gets the suffix written back (a no-op where its
    tail already is the suffix)."""
    if len(ids) < max_length:
        return ids
    ids = ids[:max_length] if direction == "right" else ids[-max_length:]
    keep = min(len(suffix), max_length)
    return ids[: max_length - keep] + suffix[len(suffix) - keep :] if keep else ids
