"""Regular-expression paths: ``~/api/v\\d+/users/(?<id>\\d+)$``, Kong's ``~`` paths.

A ``match.paths`` entry that starts with ``~`` is a Python ``re`` pattern, compiled once when
the config is loaded. The config schema and the matcher both go through ``compile_path_regex``,
so a pattern the schema accepted is one the matcher compiles. Kong (PCRE, and Rust's regex since
Kong 3) writes named groups ``(?<name>...)``; Python only knows ``(?P<name>...)``, so they are
translated first (look-behinds, ``(?<=`` and ``(?<!``, are left alone).

``literal_prefix`` gives the text every match starts with (``/api/v`` for the pattern above):
the matcher compares it with ``str.startswith`` before running the regex (0.04 µs against
0.2 µs or more for a failing ``re.match``), and ranks longer literal starts first. It is
conservative: when unsure (an alternation at the top level, an escape it does not know, a
quantifier) it stops, and a shorter prefix only costs a regex call, never a missed match.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["REGEX_MARK", "compile_path_regex", "literal_prefix"]

REGEX_MARK: Final = "~"

# metacharacters that end a literal run; "{" is taken for a quantifier even where re would
# read it literally ("/a{"): stopping early is always safe
_SPECIAL: Final = frozenset(".^$*+?{}[]|()\\")
_QUANTIFIERS: Final = frozenset("*+?{")


def compile_path_regex(text: str) -> re.Pattern[str]:
    """Compile the path entry ``text`` (``~/...``); ValueError with the reason otherwise."""
    if not text.startswith(REGEX_MARK + "/"):
        raise ValueError(f"invalid path {text!r}: a regex path must start with '~/'")
    source, inserted = _python_groups(text[len(REGEX_MARK) :])
    try:
        return re.compile(source)
    except re.error as exc:
        where = ""
        if exc.pos is not None:  # a position in `text` as written, "~" included
            position = exc.pos - sum(1 for at in inserted if at < exc.pos) + len(REGEX_MARK)
            where = f" at position {position}"
        # quoted as written: repr() would double every backslash of the regex
        raise ValueError(f"invalid regex '{text}': {exc.msg}{where}") from None


def _python_groups(source: str) -> tuple[str, list[int]]:
    """``source`` with ``(?<name>`` written ``(?P<name>``, and where each "P" went in."""
    out: list[str] = []
    inserted: list[int] = []
    i, n, in_class = 0, len(source), False
    while i < n:
        char = source[i]
        if char == "\\":
            out.append(source[i : i + 2])
            i += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
            out.append(char)
            i += 1
            for special in "^]":  # "[]" and "[^]" open a class whose "]" is literal
                if source[i : i + 1] == special:
                    out.append(special)
                    i += 1
            continue
        elif source.startswith("(?<", i) and source[i + 3 : i + 4] not in ("=", "!"):
            inserted.append(sum(len(piece) for piece in out) + 2)
            out.append("(?P<")
            i += 3
            continue
        out.append(char)
        i += 1
    return "".join(out), inserted


def literal_prefix(pattern: re.Pattern[str]) -> str:
    """The text every match of ``pattern`` (anchored at the start) begins with."""
    source = pattern.pattern
    if pattern.flags & re.IGNORECASE or _alternates_at_top(source):
        return ""
    units: list[str] = []
    i, n = 0, len(source)
    while i < n:
        char = source[i]
        if char in _QUANTIFIERS:  # the unit before it may be missing or repeated
            if units:
                units.pop()
            break
        if char == "\\":
            escaped = source[i + 1 : i + 2]
            # "\." or "\/" is the character; "\d", "\1", "\x41", "\A"... are not plain text
            if not escaped or (escaped.isascii() and escaped.isalnum()):
                break
            units.append(escaped)
            i += 2
            continue
        if char in _SPECIAL:
            break
        units.append(char)
        i += 1
    return "".join(units)


def _alternates_at_top(source: str) -> bool:
    """Whether ``source`` has a ``|`` outside every group: ``/a|/b`` starts with no one text."""
    depth, i, n, in_class = 0, 0, len(source), False
    while i < n:
        char = source[i]
        if char == "\\":
            i += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
            i += 1
            for special in "^]":
                if source[i : i + 1] == special:
                    i += 1
            continue
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "|" and depth == 0:
            return True
        i += 1
    return False
