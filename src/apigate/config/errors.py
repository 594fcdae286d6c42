"""Configuration errors, one line per problem: `path: message`.

Paths read like the YAML they point into (`routes[2].plugins.jwt.secrt`,
`services.hello.timeouts.conect`), and messages are short and lower-case. pydantic reports an
unknown key as "Extra inputs are not permitted" at the key's path; `explain_unknown_keys`
replaces that with "unknown key; did you mean 'connect'?" while the model that knows its field
names is still at hand (see `schema.StrictModel`), so nested models get it for free.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from typing import Any, get_args

from pydantic import ValidationError
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError, core_schema

__all__ = [
    "ConfigError",
    "Loc",
    "error_message",
    "explain_unknown_keys",
    "format_loc",
    "format_validation_error",
    "located_error",
    "unknown_key_message",
]

Loc = tuple[str | int, ...]

_KNOWN_ERROR_TYPES = frozenset(get_args(core_schema.ErrorType))
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_\-]+")
# pydantic prefixes the text of a plain ValueError / AssertionError raised in a validator.
_NOISE_PREFIXES = ("Value error, ", "Assertion failed, ")
# pydantic's error types for "not a mapping" (a model's section, or a plain dict field)
_MAPPING_TYPES = frozenset({"model_type", "model_attributes_type", "dict_type"})


class ConfigError(Exception):
    """An invalid configuration; `errors` holds one "path: message" line per problem."""

    def __init__(self, errors: str | Iterable[str], source: str | None = None) -> None:
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        self.source = source
        super().__init__(*self.errors)

    def __str__(self) -> str:
        if self.source is None:
            return "\n".join(self.errors)
        return f"{self.source}:\n" + "\n".join(f"  {line}" for line in self.errors)


def invalid_report(path: object, exc: ConfigError) -> str:
    """What the CLI prints for an invalid config file: its name once, then one indented line
    per problem, whichever check found them (the schema's errors carry the file as their
    source, a plugin's or a TLS file's do not); a source other than the file (a stored
    overlay) is named on a line of its own."""
    lines = [f"{path}: invalid"]
    indent = "  "
    if exc.source is not None and exc.source != str(path):
        lines.append(f"  {exc.source}:")
        indent = "    "
    lines += [f"{indent}{line}" for line in exc.errors]
    return "\n".join(lines)


def format_loc(loc: Sequence[str | int], prefix: str = "") -> str:
    """`("routes", 2, "plugins", "jwt")` -> `routes[2].plugins.jwt` (after `prefix`)."""
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif _PLAIN_KEY.fullmatch(part):
            path += f".{part}" if path else part
        else:  # a key with dots, colons or spaces, e.g. a plugin's dotted import path
            path += f"[{part!r}]"
    return path


def error_message(error: ErrorDetails) -> str:
    """A short lower-case message for one pydantic error."""
    kind = error["type"]
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind in _MAPPING_TYPES:
        # pydantic says "a valid dictionary or instance of TimeoutsConfig": Python's words and
        # a class the user never wrote, for `timeouts: 5s` written in YAML
        return f"must be a mapping of keys, not {_described(error['input'])}"
    message = error["msg"]
    for noise in _NOISE_PREFIXES:
        message = message.removeprefix(noise)
    if kind in _KNOWN_ERROR_TYPES and message[:2].istitle():
        message = message[0].lower() + message[1:]  # "Input should be" -> "input should be"
    return message


def _described(value: Any) -> str:
    """What kind of YAML value this is, as its writer would name it ("a string", "true"); never
    the value itself, which may be a secret written in the wrong place (`basic_auth: u:pw`)."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


def format_validation_error(exc: ValidationError, prefix: str = "") -> list[str]:
    """One "path: message" line per error in `exc`, each path starting with `prefix`.

    Plugins use it to report their own config in the file's terms:
    `format_validation_error(exc, "routes[2].plugins.jwt")`.
    """
    lines = []
    for error in exc.errors():
        path = format_loc(error["loc"], prefix)
        message = error_message(error)
        lines.append(f"{path}: {message}" if path else message)
    return lines


def unknown_key_message(key: str, known: Iterable[str]) -> str:
    """ "unknown key; did you mean 'connect'?" or just "unknown key"."""
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"unknown key; did you mean {close[0]!r}?" if close else "unknown key"


def explain_unknown_keys(exc: ValidationError, known: Iterable[str]) -> ValidationError | None:
    """`exc` with its top-level unknown-key errors explained, or None when it has none.

    Only errors whose location is a single key belong to the model being validated; deeper
    ones were already explained by the nested model that raised them.
    """
    errors = exc.errors()
    if not any(e["type"] == "extra_forbidden" and len(e["loc"]) == 1 for e in errors):
        return None
    names = list(known)
    line_errors: list[InitErrorDetails] = []
    for error in errors:
        if error["type"] == "extra_forbidden" and len(error["loc"]) == 1:
            message = unknown_key_message(str(error["loc"][0]), names)
            line_errors.append(_custom(error["loc"], message, error["input"], "unknown_key"))
        else:
            line_errors.append(_as_init_details(error))
    return ValidationError.from_exception_data(exc.title, line_errors)


def located_error(title: str, problems: Iterable[tuple[Loc, str]]) -> ValidationError:
    """A ValidationError with one custom error per (location, message) pair.

    Raised from a model validator, its locations nest under the model's own path, so
    cross-field checks can point at the exact key (`routes[1].service`).
    """
    line_errors = [_custom(loc, message, None, "invalid_config") for loc, message in problems]
    return ValidationError.from_exception_data(title, line_errors)


def _custom(loc: Loc, message: str, value: Any, kind: str) -> InitErrorDetails:
    # PydanticCustomError formats its template only when given a context, so braces in the
    # message ("{user_id}") are safe here.
    return {"type": PydanticCustomError(kind, message), "loc": loc, "input": value}


def _as_init_details(error: ErrorDetails) -> InitErrorDetails:
    """Turn a reported error back into one that `from_exception_data` accepts."""
    if error["type"] in _KNOWN_ERROR_TYPES:
        details: InitErrorDetails = {
            "type": error["type"],
            "loc": error["loc"],
            "input": error["input"],
        }
        if "ctx" in error:
            details["ctx"] = error["ctx"]
        return details
    return _custom(error["loc"], error["msg"], error["input"], error["type"])
