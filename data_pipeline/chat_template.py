"""Conversations rendered to token ids with a chat template, and which ids carry the loss.

A record is `{"messages": [{"role": ..., "content": ...}, ...]}` (roles `system`, `user`,
`assistant`, or any the template knows) or `{"prompt": ..., "response": ...}` (one user and
one assistant turn). The template is a Jinja chat template, as Hugging Face tokenizers carry
in `tokenizer_config.json` (`chat_template`) or `chat_template.jinja`; tokenizers without one
(ours, sentencepiece) use DEFAULT_TEMPLATE:

    <|system|>
    You are terse.
    <|user|>
    def f(x):
    <|assistant|>
    Return x.

each turn `<|role|>` and its content on lines of their own. Which tokens are trained is
found from the template itself, as transformers' `return_assistant_tokens_mask` does
without template markers: for each assistant turn i, the render of the turns before it with
the generation prompt is a prefix of the render that includes it; the text between the two
is the assistant's (its content and whatever the template closes the turn with, e.g.
`<|im_end|>`), and is trained; everything else (system, user, the generation prompts) is
not. Each piece is tokenized on its own, so a token never straddles the boundary.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scaleforge.data_pipeline.tokenizer import Tokenizer
from scaleforge.errors import ConfigError

DEFAULT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# template= values besides a path to a .jinja file
TEMPLATE_CHOICES = ("auto", "tokenizer", "default")
ASSISTANT = "assistant"


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template and the special-token strings it may refer to."""

    source: str
    name: str  # where it came from, for messages: "default" or a file
    bos_token: str = ""
    eos_token: str = ""

    def render(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        """The template's text of `messages` (what transformers' apply_chat_template
        renders with tokenize=False)."""
        return _compiled(self.source).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token, eos_token=self.eos_token,
        )


def load_template(setting: str, tokenizer_path: Path) -> ChatTemplate:
    """The chat template that `template=setting` names for the tokenizer at `tokenizer_path`:
    `auto` (the tokenizer's own when it has one, else DEFAULT_TEMPLATE), `tokenizer` (its
    own; ConfigError when it has none), `default`, or a path to a Jinja file."""
    if setting == "default":
        return ChatTemplate(DEFAULT_TEMPLATE, "default")
    if setting not in TEMPLATE_CHOICES:
        path = Path(setting)
        if not path.is_file():
            raise ConfigError(
                f"template={setting!r} is neither one of {', '.join(TEMPLATE_CHOICES)} nor a "
                "Jinja file; give a chat template file or template=auto"
            )
        return ChatTemplate(path.read_text(), str(path), *_special_tokens(tokenizer_path))
    own = tokenizer_template(tokenizer_path)
    if own is not None:
        return own
    if setting == "tokenizer":
        raise ConfigError(
            f"template=tokenizer but the tokenizer {tokenizer_path} has no chat template (no "
            "chat_template in tokenizer_config.json, no chat_template.jinja beside it); use "
            "template=default or template=FILE.jinja"
        )
    return ChatTemplate(DEFAULT_TEMPLATE, "default")


def tokenizer_template(tokenizer_path: Path) -> ChatTemplate | None:
    """The chat template stored beside a Hugging Face tokenizer (`chat_template.jinja`, or
    `chat_template` in tokenizer_config.json: a string, or a list of named templates of
    which `default` is taken), or None."""
    directory = tokenizer_path if tokenizer_path.is_dir() else tokenizer_path.parent
    bos, eos = _special_tokens(directory)
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return ChatTemplate(jinja_file.read_text(), str(jinja_file), bos, eos)
    config = _tokenizer_config(directory)
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template}
        template = named.get("default")
    if not isinstance(template, str):
        return None
    return ChatTemplate(template, str(directory / "tokenizer_config.json"), bos, eos)


@dataclass(frozen=True)
class RenderedConversation:
    """A conversation's token ids and, per id, whether it is trained (an assistant's)."""

    ids: list[int]
    trained: list[bool]


def conversation_messages(record: dict, where: str) -> list[dict]:
    """The messages of a JSONL record (`messages`, or `prompt` + `response`), checked: every
    message a dict with a string `role` and `content`, at least one assistant turn."""
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record and "response" in record:
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": ASSISTANT, "content": record["response"]}]
    else:
        raise ConfigError(
            f"{where}: a record needs `messages` (a list of role/content turns) or `prompt` "
            f"and `response`; it has {', '.join(sorted(record)) or 'no fields'}"
        )
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str) for m in messages
    ):
        raise ConfigError(
            f"{where}: `messages` must be a list of {{\"role\": str, \"content\": str}} turns"
        )
    if not any(m["role"] == ASSISTANT for m in messages):
        raise ConfigError(
            f"{where}: the conversation has no assistant turn, so nothing in it would be "
            "trained; add the assistant's reply or remove the record"
        )
    return messages


def render_conversation(messages: Sequence[dict], template: ChatTemplate,
                        tokenizer: Tokenizer, where: str) -> RenderedConversation:
    """Token ids of `messages` rendered by `template`, and which of them are trained: the
    assistant turns (module docstring). ConfigError when the template renders a
    conversation's beginning differently from the conversation's first turns alone."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    for index, message in enumerate(messages):
        if message["role"] != ASSISTANT:
            continue
        prompt = template.render(messages[:index], add_generation_prompt=True)
        with_reply = template.render(messages[: index + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not with_reply.startswith(prompt):
            raise ConfigError(
                f"{where}: the chat template {template.name} does not render turn {index} as "
                "an extension of the turns before it, so the assistant's tokens cannot be "
                "found; use template=default or a template that renders turns in order"
            )
        pieces += [(prompt[len(done):], False), (with_reply[len(prompt):], True)]
        done = with_reply
    whole = template.render(messages, add_generation_prompt=False)
    if not whole.startswith(done):
        raise ConfigError(
            f"{where}: the chat template {template.name} renders the whole conversation "
            "differently from its turns; use template=default"
        )
    pieces.append((whole[len(done):], False))
    pieces = [(text, trained) for text, trained in pieces if text]
    encoded = tokenizer.encode_many([text for text, _ in pieces], num_threads=1)
    ids = [i for piece in encoded for i in piece]
    trained = [flag for piece, (_, flag) in zip(encoded, pieces, strict=True) for _ in piece]
    return RenderedConversation(ids, trained)


def _compiled(source: str) -> Any:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if source not in _TEMPLATES:
        # transformers' settings for chat templates: the same text renders the same way.
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                    extensions=[loopcontrols])
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise_template_error
        _TEMPLATES[source] = environment.from_string(source)
    return _TEMPLATES[source]


_TEMPLATES: dict[str, Any] = {}


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_template_error(message: str) -> None:
    raise ConfigError(f"the chat template refused a conversation: {message}")


def _tokenizer_config(directory: Path) -> dict:
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return {}
    config = json.loads(path.read_text())
    return config if isinstance(config, dict) else {}


def _special_tokens(directory: Path) -> tuple[str, str]:
    """(bos_token, eos_token) strings of tokenizer_config.json, '' where absent."""
    config = _tokenizer_config(directory if directory.is_dir() else directory.parent)

    def token(key: str) -> str:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        return value if isinstance(value, str) else ""

    return token("bos_token"), token("eos_token")
