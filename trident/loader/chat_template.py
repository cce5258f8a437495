"""Rendering Hugging Face chat templates (Jinja2) the way transformers does, in a sandbox.

The environment matches transformers': an immutable sandbox with ``trim_blocks``, ``lstrip_blocks`` and
loop controls; a ``tojson`` that keeps non-ASCII text; ``raise_exception`` and ``strftime_now``
globals. Messages are copied as plain JSON data, keys whose value is None are dropped, and the
special tokens (bos_token, eos_token, ...) are template variables. Errors the template raises on bad
input (roles not alternating, ...) become :class:`TridentError`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from trident.errors import TridentError


class _TemplateRaised(Exception):
    """What ``raise_exception`` in a template throws."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    """A compiled template; a TridentError when the Jinja source does not parse."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TridentError(f"the model's chat template is not valid Jinja (line {e.lineno}: {e.message})") from None


def _plain(value: Any) -> Any:
    """A copy made only of JSON types (other objects become an inert "<TypeName>" string)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validate a conversation and copy it as plain data, dropping keys whose value is None."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TridentError("a chat must be a list of messages like {'role': 'user', 'content': 'Hi'}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message:
            raise TridentError(
                f"chat message {i} must be a dict with a 'role' (and usually 'content'), got {message!r}"
            )
        out.append({str(k): _plain(v) for k, v in message.items() if v is not None})
    return out


def render_chat_template(
    template: jinja2.Template,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool,
    special_tokens: Mapping[str, str],
    tools: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> str:
    """The conversation rendered to the model's prompt text."""
    variables = {**special_tokens, **_plain(extra)}
    try:
        return template.render(
            messages=normalize_messages(messages),
            tools=_plain(tools),
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except _TemplateRaised as e:
        raise TridentError(f"the model's chat template rejected this conversation: {e}") from None
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise TridentError(f"the model's chat template failed on this conversation: {e}") from None
