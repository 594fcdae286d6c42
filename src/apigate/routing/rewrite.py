"""Upstream path rewrites: ``strip_prefix`` and path templates such as ``/v2/users/{user_id}``.

Both work on paths already canonical (see ``normalize.py``) and on the ``Match`` the matcher
returned: ``match.prefix`` is the concrete part of the request path the route matched, and the
*rest* is ``path[len(match.prefix):]``, either ``""`` or a string starting with ``/`` (after
the root route's prefix ``/`` it lacks that slash; both functions put it back).

Parameter values are decoded text (``Match.params``); a template percent-encodes them again on
the way out, so a value can never add a path separator: ``/`` becomes ``%2F``, and ``?``, ``#``
and ``%`` are encoded too. A dot segment cannot be escaped (``%2E%2E`` *is* ``..`` to every
normaliser, ours included), so a rewrite whose values would produce one (a value ``..``, or
``.`` next to a literal ``.``) raises ``ValueError`` and the caller answers 400. The matcher
never captures such a value: normalisation has already removed dot segments. Bytes that were not
UTF-8 come back through PEP 383 surrogate escapes, so they reach the upstream unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from urllib.parse import quote

from apigate.routing.normalize import normalize_path

__all__ = ["Template", "compile_template", "encode_param", "has_bad_segment", "strip"]

Template = Callable[[dict[str, str], str], str]
"""A compiled rewrite: ``(params, rest) -> upstream path``."""

# pchar = unreserved / pct-encoded / sub-delims / ":" / "@" (RFC 3986 §3.3); quote() always
# keeps the unreserved ones, so only sub-delims, ":" and "@" are listed.
_SEGMENT_SAFE = "!$&'()*+,;=:@"
_SEGMENT_SAFE_CHARS = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~" + _SEGMENT_SAFE
)


def strip(path: str, prefix: str) -> str:
    """Remove the matched ``prefix`` from ``path``, keeping a leading slash."""
    if prefix.endswith("/"):
        prefix = prefix[:-1]
    rest = path[len(prefix) :]
    if not rest:
        return "/"
    return rest if rest.startswith("/") else "/" + rest


def encode_param(value: str) -> str:
    """Percent-encode one parameter value so that it stays inside one path segment."""
    # Ids are nearly always safe as they are: the set test costs 0.1 µs, quote() 0.6 µs.
    if _SEGMENT_SAFE_CHARS.issuperset(value):
        return value
    return quote(value, safe=_SEGMENT_SAFE, errors="surrogateescape")


def compile_template(template: str, params: Collection[str] | None = None) -> Template:
    """Compile ``template`` once into ``(params, rest) -> path``.

    ``params``, when given, names the parameters the route captures; a template that uses any
    other name raises ``ValueError`` when it is compiled rather than failing on a request.
    """
    if not template.startswith("/"):
        raise ValueError(f"rewrite template {template!r} must start with '/'")
    literals, names = _parse(template)
    # Checked with a stand-in value: the literal text must already be canonical, so that the
    # upstream gets exactly what the operator wrote ("/v2/../x" or "/a//b" are mistakes).
    sample = "x".join(literals)
    canonical = normalize_path(sample)
    if canonical != sample:
        raise ValueError(
            f"rewrite template {template!r} is not a canonical path"
            + (f" (it reads as {canonical!r})" if canonical is not None else "")
        )
    if params is not None:
        unknown = [name for name in names if name not in params]
        if unknown:
            raise ValueError(
                f"rewrite template {template!r} uses unknown parameter(s) {', '.join(unknown)}"
            )
    # The final literal absorbs the join with ``rest``: "/v2/" + "/x" must not give "/v2//x".
    last = literals[-1]
    last_without_slash = last[:-1] if last.endswith("/") else last
    if not names:
        return _constant(last, last_without_slash)
    return _with_params(tuple(literals), tuple(names), last_without_slash)


def _constant(path: str, path_without_slash: str) -> Template:
    def rewrite(params: dict[str, str], rest: str) -> str:
        if not rest:
            return path
        if rest.startswith("/"):
            return path_without_slash + rest
        return path_without_slash + "/" + rest

    return rewrite


def _with_params(literals: tuple[str, ...], names: tuple[str, ...], tail: str) -> Template:
    pairs = tuple(zip(literals, names, strict=False))
    end = literals[-1]

    def rewrite(params: dict[str, str], rest: str) -> str:
        parts = [literal + encode_param(params[name]) for literal, name in pairs]
        if not rest:
            parts.append(end)
        elif rest.startswith("/"):
            parts.append(tail + rest)
        else:
            parts.append(tail + "/" + rest)
        path = "".join(parts)
        if has_bad_segment(path):
            raise ValueError(f"rewrite to {path!r} would add a dot segment or an empty one")
        return path

    return rewrite


def has_bad_segment(path: str) -> bool:
    """Whether `path` has a ".", ".." or empty segment: one a value put into a template made
    (an empty value makes `/tenants/{x}/orders` `/tenants//orders`), which the upstream would
    resolve (RFC 3986 §5.2.4), or merge, to somewhere the template does not say."""
    return "//" in path or (
        "/." in path and any(segment in (".", "..") for segment in path.split("/"))
    )


def _parse(template: str) -> tuple[list[str], list[str]]:
    """Split ``template`` into literals and parameter names: len(literals) == len(names) + 1."""
    literals: list[str] = []
    names: list[str] = []
    position = 0
    while True:
        opening = template.find("{", position)
        closing = template.find("}", position)
        if closing != -1 and (opening == -1 or closing < opening):
            raise ValueError(f"rewrite template {template!r}: unmatched '}}' at {closing}")
        if opening == -1:
            literals.append(template[position:])
            return literals, names
        closing = template.find("}", opening)
        name = template[opening + 1 : closing] if closing != -1 else ""
        if closing == -1 or not name.isidentifier():
            raise ValueError(f"rewrite template {template!r}: bad parameter at {opening}")
        literals.append(template[position:opening])
        names.append(name)
        position = closing + 1
