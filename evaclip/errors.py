"""Errors that are the user's to fix: shown as one line, never as a traceback."""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError


class UserError(Exception):
    """A mistake in the input that the user can fix; the message says how."""


class SpecError(UserError):
    """A manifest that does not describe a valid EvaClipFinetune."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).isprintable() or not str(part):
            out += f"[{str(part)!r}]"  # a key with line breaks must not break the one line
        else:
            out += f".{part}" if out else str(part)
    return out


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def describe_validation_error(err: ValidationError, prefix: str = "") -> SpecError:
    """Turn the first pydantic error into one line: field, bad value, what is allowed."""
    first = err.errors(include_url=False)[0]
    # Model-level validators raise with loc () and name the fields in their message.
    loc = tuple(p for p in first["loc"] if p not in ("function-after", "function-before"))
    field = ".".join(x for x in [prefix, _path(loc)] if x)
    msg = re.sub(r" or instance of \w+", "", first["msg"].removeprefix("Value error, "))
    kind = first["type"]
    if kind == "missing":
        text = f"{field}: required field is missing"
    elif kind == "extra_forbidden":
        text = f"{field}: unknown field; check the spelling against `kubectl explain` or docs"
    elif kind == "value_error" and isinstance(first.get("input"), dict):
        # Cross-field checks of a whole object start their message with the field path
        # relative to that object.
        text = f"{field}.{msg}" if field else msg
    else:
        text = f"{field}: got {_shown(first.get('input'))}; {msg}"
    text = " ".join(text.splitlines())  # messages may echo input with line breaks
    more = err.error_count() - 1
    if more:
        text += f" (and {more} more problem{'s' if more > 1 else ''})"
    return SpecError(text, field=field or None)
