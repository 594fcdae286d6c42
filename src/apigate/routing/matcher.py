"""Route matching: host bucket → path segment trie → ordered candidates.

Theory of operation
-------------------
Routes are compiled once per runtime snapshot; a request then costs one host lookup, one walk
down a segment trie and a scan of the few candidates found on that walk. Nothing is compiled,
copied or sorted per request, so 10,000 routes cost what 10 do.

Path patterns (CONFIG.md): ``/a/b`` is a prefix on segment boundaries (it matches ``/a/b``,
``/a/b/`` and ``/a/b/c``, never ``/a/bc``); ``/`` matches every path; ``{name}`` captures exactly
one non-empty segment; ``=/a/b`` matches only the path ``/a/b``. Patterns are normalised like
request paths (``normalize.py``), and a trailing slash on a prefix pattern is dropped.
``~/api/v\\d+/users/(?<id>\\d+)$`` is a regular expression (``regex_path.py``), matched with
``re.match`` against the normalised path: anchored at the start, a prefix match unless it ends
with ``$``, and not bound to segment boundaries (``~/api/v\\d+`` matches ``/api/v1x``), as in
Kong. Its named groups are parameters like ``{name}`` (one that took no part is ``""``), and
the text it matched is the prefix ``strip_prefix`` removes.

Precedence — the most specific route wins, whatever the order of the file:

1. **Host.** The host picks a group of routes first, as a virtual host does in Envoy and Kong:
   routes naming the exact host, then routes whose wildcard ``*.suffix`` matches (longest
   suffix first), then routes with no host condition. A group is consulted only when the ones
   before it have no route that matches the request, so a host-less route is the fallback for
   a host whose own routes do not match. The port in ``Host`` is ignored.
2. **Exact** paths (``=/a``) beat regex paths, which beat prefix paths however deep (Kong's
   order, and nginx's: a catch-all ``/`` or an ``/api`` never hides a regex written for a case).
   Regex paths among themselves: the higher ``regex_priority`` first (Kong's key, default 0),
   then the longer literal start (``~/users/me$`` before ``~/users/\\w+``), then header and
   method conditions as in rule 5, then **file order**: the one place where it decides between
   different patterns, since which of two regexes is the more specific cannot be computed.
3. **Deeper** patterns beat shallower ones: the longer prefix wins (``/{x}/b`` beats ``/a``).
4. At the same depth, compared segment by segment from the left, a **literal** segment beats
   a ``{param}`` (``/users/me`` beats ``/users/{id}``; ``/a/{x}`` beats ``/{y}/b``).
5. For the same path pattern: more **header** conditions first, then routes with a **method**
   list before method-any routes, then **file order**.

Regex paths cost a host group without any one test. In one with some, they are tried in
order once the trie walk found no exact path: only those whose literal start names the
request's first segment (``api`` for ``~/api/v\\d+``), picked with one dict lookup, and those
whose literal start names no whole segment (``~/(?<t>\\w+)/x``, ``~/api\\d``); each is
skipped by ``str.startswith`` of its literal start before ``re.match`` runs. (On the 2-core
development VM, 100 regexes under other first segments add under 0.1 µs compiled, 0.25 µs
in pure Python, to a request the catch-all ``/`` gets; 100 that name no segment add about
12 µs compiled, 24 µs pure.)

A route matches only when all its conditions do (host, path, headers, method); the first
matching route in the order above wins. When none matches but some route failed on its method
alone, ``NoMatch.allowed_methods`` holds their methods for a 405 with an ``Allow`` header.
Header values compare exactly; the value ``*`` only asks that the header be present.

Parameter values are percent-decoded (``%2F`` in a segment yields ``/`` in the value; bytes
that are not UTF-8 become PEP 383 surrogate escapes), and ``rewrite.compile_template`` encodes
them again on the way out.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Final
from urllib.parse import quote, unquote

from apigate.http.headers import host_name, underscore_spellings
from apigate.routing.normalize import normalize_path, other_readings
from apigate.routing.regex_path import REGEX_MARK, compile_path_regex, literal_prefix

__all__ = ["Match", "Matcher", "NoMatch", "RouteSpec", "RouteSpecError"]

HeaderLookup = Callable[[str], str | None]


# Plain classes rather than dataclasses: mypyc compiles this module, and its dataclass support
# fails at import on these annotations (KeyError: 'object').
class RouteSpec:
    """One route's match conditions, as the config compiler hands them over."""

    __slots__ = ("headers", "hosts", "methods", "name", "paths", "payload", "regex_priority")

    def __init__(
        self,
        name: str,
        paths: tuple[str, ...],
        methods: frozenset[str] | None = None,
        hosts: tuple[str, ...] | None = None,
        headers: tuple[tuple[str, str], ...] | None = None,
        payload: object = None,
        regex_priority: int = 0,
    ) -> None:
        self.name = name
        self.paths = paths
        self.methods = methods
        self.hosts = hosts
        self.headers = headers
        self.payload = payload
        self.regex_priority = regex_priority  # orders this route's "~" paths among regex paths

    def _key(self) -> tuple[object, ...]:
        return (
            self.name,
            self.paths,
            self.methods,
            self.hosts,
            self.headers,
            self.payload,
            self.regex_priority,
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RouteSpec) and other._key() == self._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"RouteSpec({self.name!r}, {self.paths!r})"


class RouteSpecError(ValueError):
    """A route the matcher cannot compile: which route, which of its match fields, and why
    (the config compiler reports it as `routes[i].match.<field>: <message>`)."""

    def __init__(self, route: str, field: str, message: str) -> None:
        super().__init__(message)
        self.route = route
        self.field = field
        self.message = message


class Match:
    """The route chosen for a request, with its captured parameters."""

    __slots__ = ("exact", "params", "prefix", "spec")

    def __init__(self, spec: RouteSpec, params: dict[str, str], prefix: str, exact: bool) -> None:
        self.spec = spec
        self.params = params
        self.prefix = prefix
        self.exact = exact

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Match) and (
            other.spec,
            other.params,
            other.prefix,
            other.exact,
        ) == (self.spec, self.params, self.prefix, self.exact)

    def __repr__(self) -> str:
        return f"Match({self.spec.name!r}, params={self.params!r}, prefix={self.prefix!r})"


class NoMatch:
    """No route matched: 405 when ``allowed_methods`` is non-empty, 404 otherwise."""

    __slots__ = ("allowed_methods",)

    def __init__(self, allowed_methods: frozenset[str] = frozenset()) -> None:
        self.allowed_methods = allowed_methods

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NoMatch) and other.allowed_methods == self.allowed_methods

    def __hash__(self) -> int:
        return hash(self.allowed_methods)

    def __repr__(self) -> str:
        return f"NoMatch({set(self.allowed_methods)!r})"


_NOT_FOUND: Final = NoMatch()
_HOST_CACHE_SIZE: Final = 1024
_MATCH_CACHE_SIZE: Final = 4096  # matches kept per method (see Matcher._matches)


class _Conditions:
    """What every entry of the compiled table checks besides its path: host, headers, methods."""

    __slots__ = ("headers", "host", "implicit_head", "methods", "pattern", "sort_key", "spec")

    def __init__(self, spec: RouteSpec, host: str, pattern: str) -> None:
        self.spec = spec
        self.host = host
        self.pattern = pattern
        methods = spec.methods
        # a GET route serves HEAD too (RFC 9110 §9.3.2; nginx's `limit_except GET`, every web
        # framework): otherwise HEAD fell through to another route, and a back end that runs
        # its GET view for HEAD answered it without this route's plugins. (A route of the
        # same pattern that names HEAD itself still gets it: see _first.)
        self.implicit_head = False
        if methods is not None and "GET" in methods and "HEAD" not in methods:
            self.implicit_head = True
            methods = methods | {"HEAD"}
        self.methods = methods
        self.headers = spec.headers or None
        self.sort_key: tuple[object, ...] = ()

    def headers_match(self, header: HeaderLookup) -> bool:
        for name, wanted in self.headers or ():
            value = header(name)
            if value is None or (wanted != "*" and value != wanted):
                return False
        return True


class _Candidate(_Conditions):
    """One (route, path pattern, host) entry of the compiled table."""

    __slots__ = ("depth", "exact", "literal_prefix", "params", "segments")

    def __init__(self, spec: RouteSpec, index: int, host: str, pattern: _Pattern) -> None:
        super().__init__(spec, host, pattern.path)
        self.segments = pattern.segments
        self.exact = pattern.exact
        self.depth = len(pattern.segments)
        self.params = pattern.params
        # Without parameters the matched prefix is the pattern itself: no join per request.
        self.literal_prefix = None if pattern.params else pattern.path
        self.sort_key = (
            0 if pattern.exact else 2,  # (1: regex paths, between exact and prefix ones)
            -self.depth,
            pattern.shape,
            -len(self.headers or ()),
            0 if self.methods is not None else 1,
            index,
        )

    def build(self, path: str, segments: list[str]) -> Match:
        params = {name: _decode(segments[i]) for i, name in self.params} if self.params else {}
        if self.exact:
            return Match(self.spec, params, path, True)
        prefix = self.literal_prefix
        if prefix is None:
            prefix = "/".join(segments[: self.depth + 1])
        return Match(self.spec, params, prefix, False)


class _RegexCandidate(_Conditions):
    """One (route, ``~`` regex path, host) entry: tried after exact paths, before prefixes."""

    __slots__ = ("first_segment", "literal", "regex")

    def __init__(
        self, spec: RouteSpec, index: int, host: str, text: str, regex: re.Pattern[str]
    ) -> None:
        super().__init__(spec, host, text)
        self.regex = regex
        self.literal = literal_prefix(regex)
        # the first segment of every path it matches, when its literal start holds it whole
        first, slash, _ = self.literal[1:].partition("/")
        self.first_segment = first if slash else None
        self.sort_key = (
            1,
            -spec.regex_priority,
            -len(self.literal),
            -len(self.headers or ()),
            0 if self.methods is not None else 1,
            index,
        )

    def build(self, found: re.Match[str]) -> Match:
        # every named group is a parameter; one that took no part in the match is ""
        params = {name: _decode(value) for name, value in found.groupdict("").items()}
        return Match(self.spec, params, found.group(), False)


def _decode(segment: str) -> str:
    return unquote(segment, errors="surrogateescape") if "%" in segment else segment


class _Pattern:
    """A parsed path pattern: its segments, which ones are parameters, and its shape."""

    __slots__ = ("exact", "params", "path", "segments", "shape", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.exact = text.startswith("=")
        raw = text[1:] if self.exact else text
        # Config authors may write "/café"; request paths arrive percent-encoded.
        path = normalize_path("".join(c if c.isascii() else quote(c) for c in raw))
        if path is None:
            raise ValueError(f"path pattern {text!r} is not a valid path")
        if not self.exact and path != "/":
            path = path.rstrip("/")
        self.path = path
        # The prefix "/" has no segments; the exact "=/" has one, empty: the path "/".
        texts = path[1:].split("/") if path != "/" or self.exact else []
        self.segments: tuple[str | None, ...] = tuple(self._segment(s) for s in texts)
        # Positions in ``path.split("/")``, whose item 0 is the empty string before the root.
        self.params = tuple(
            (i + 1, s[1:-1]) for i, s in enumerate(texts) if self.segments[i] is None
        )
        names = [name for _, name in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"path pattern {text!r} repeats a parameter name")
        # 0 = literal, 1 = parameter: compared left to right, literal segments sort first.
        self.shape = tuple(0 if s is not None else 1 for s in self.segments)

    def _segment(self, segment: str) -> str | None:
        """The literal text of a segment, or None for a ``{param}`` segment."""
        if segment.startswith("{") and segment.endswith("}") and segment[1:-1].isidentifier():
            return None
        if "{" in segment or "}" in segment:
            raise ValueError(f"path pattern {self.text!r}: a parameter must fill its segment")
        return segment


class _Node:
    """A segment trie node; candidates are sorted once, when the table is built."""

    __slots__ = ("children", "exact", "param", "prefix")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.param: _Node | None = None
        self.exact: tuple[_Candidate, ...] = ()
        self.prefix: tuple[_Candidate, ...] = ()

    def insert(self, segments: tuple[str | None, ...]) -> _Node:
        node = self
        for segment in segments:
            if segment is None:
                if node.param is None:
                    node.param = _Node()
                node = node.param
            else:
                node = node.children.setdefault(segment, _Node())
        return node


_depth_of: Final = itemgetter(0)


def _sort_key(candidate: _Conditions) -> tuple[object, ...]:
    return candidate.sort_key


class _Bucket:
    """The routes of one host group: a segment trie, and the regex paths in their order."""

    __slots__ = ("candidates", "has_regexes", "regexes", "regexes_by_segment", "root")

    def __init__(self, candidates: list[_Conditions]) -> None:
        candidates.sort(key=_sort_key)
        self.candidates = tuple(candidates)
        # Regex paths by the first segment their literal start names ("api" for "~/api/v\d+"),
        # each tuple with the unindexed ones merged in, in priority order: a request tries
        # only those that can match its first segment, found with one dict lookup.
        regexes = [c for c in candidates if isinstance(c, _RegexCandidate)]
        self.has_regexes = bool(regexes)
        self.regexes = tuple(c for c in regexes if c.first_segment is None)
        self.regexes_by_segment = {
            key: tuple(c for c in regexes if c.first_segment in (None, key))
            for key in dict.fromkeys(c.first_segment for c in regexes)
            if key is not None
        }
        self.root = _Node()
        ends: dict[int, tuple[_Node, list[_Candidate], list[_Candidate]]] = {}
        for candidate in self.candidates:  # already in priority order, so each list is too
            if not isinstance(candidate, _Candidate):
                continue
            node = self.root.insert(candidate.segments)
            _, exact, prefix = ends.setdefault(id(node), (node, [], []))
            (exact if candidate.exact else prefix).append(candidate)
        for node, exact, prefix in ends.values():
            node.exact, node.prefix = tuple(exact), tuple(prefix)

    def find(
        self,
        method: str,
        path: str,
        segments: list[str],
        header: HeaderLookup,
        allowed: set[str],
    ) -> Match | None:
        """Walk the trie once; return the best matching route, or None.

        ``segments`` is ``path.split("/")``: segment ``i`` of the path is ``segments[i + 1]``.
        Methods of routes that failed on their method alone are added to ``allowed``.
        """
        count = len(segments)
        exact_nodes: list[_Node] = []
        hits: list[tuple[int, _Node]] = []
        branched = False
        # Depth-first, literal child before parameter child: nodes of equal depth come out in
        # priority order (rule 4). Only a node with both children pushes a branch for later;
        # without one, the hits also come out by rising depth and need no sort. Walking a
        # literal-only chain this way costs no more than a loop specialised for it (measured).
        stack: list[tuple[_Node, int]] = []
        node, position = self.root, 1
        while True:
            if node.prefix:
                hits.append((position, node))
            if position == count:
                if node.exact:
                    exact_nodes.append(node)
            else:
                segment = segments[position]
                child = node.children.get(segment)
                param = node.param
                if param is not None and segment:
                    if child is None:
                        node, position = param, position + 1
                        continue
                    stack.append((param, position + 1))
                    branched = True
                if child is not None:
                    node, position = child, position + 1
                    continue
            if not stack:
                break
            node, position = stack.pop()
        for node in exact_nodes:
            found = _first(node.exact, method, path, segments, header, allowed)
            if found is not None:
                return found
        if self.has_regexes:  # (False in a group without any: one test, ~0.02 µs)
            regexes = self.regexes_by_segment.get(segments[1], self.regexes)
            found = _first_regex(regexes, method, path, header, allowed)
            if found is not None:
                return found
        if branched:
            hits.sort(key=_depth_of, reverse=True)  # stable: equal depths keep rule-4 order
        else:
            hits.reverse()
        for _, node in hits:
            found = _first(node.prefix, method, path, segments, header, allowed)
            if found is not None:
                return found
        return None


def _first(
    candidates: tuple[_Candidate, ...],
    method: str,
    path: str,
    segments: list[str],
    header: HeaderLookup,
    allowed: set[str],
) -> Match | None:
    for index, candidate in enumerate(candidates):
        if candidate.headers is not None and not candidate.headers_match(header):
            continue
        methods = candidate.methods
        if methods is not None and method not in methods:
            allowed.update(methods)
            continue
        if candidate.implicit_head and method == "HEAD":
            named = _naming_head(candidates[index + 1 :], header)
            if isinstance(named, _Candidate):
                return named.build(path, segments)
        return candidate.build(path, segments)
    return None


def _first_regex(
    candidates: tuple[_RegexCandidate, ...],
    method: str,
    path: str,
    header: HeaderLookup,
    allowed: set[str],
) -> Match | None:
    """The first regex path, in priority order, that matches with its route's conditions."""
    for index, candidate in enumerate(candidates):
        if not path.startswith(candidate.literal):
            continue
        if candidate.headers is not None and not candidate.headers_match(header):
            continue
        found = candidate.regex.match(path)
        if found is None:
            continue
        methods = candidate.methods
        if methods is not None and method not in methods:
            allowed.update(methods)
            continue
        if candidate.implicit_head and method == "HEAD":
            same = tuple(c for c in candidates[index + 1 :] if c.pattern == candidate.pattern)
            named = _naming_head(same, header)
            if isinstance(named, _RegexCandidate):
                return named.build(found)
        return candidate.build(found)
    return None


def _naming_head(candidates: Sequence[_Conditions], header: HeaderLookup) -> _Conditions | None:
    """The first of `candidates` whose route lists HEAD itself: it wins HEAD over a GET
    route of the same pattern that only serves HEAD as GET's (rule 5 would rank them by
    header conditions and file order alone)."""
    for candidate in candidates:
        methods = candidate.methods
        if methods is None or "HEAD" not in methods or candidate.implicit_head:
            continue
        if candidate.headers is None or candidate.headers_match(header):
            return candidate
    return None


def _host_key(host: str) -> str:
    host = host.lower()
    if host == "*":
        return host
    literal = ipv6_host(host)
    if literal is not None:  # "::1" or "[::1]": keyed as a Host header writes it
        return literal
    if host.endswith("."):
        host = host[:-1]
    if not host or ":" in host or "/" in host or "*" in host[1:]:
        raise ValueError(f"host {host!r} must be a name or '*.suffix', without a port")
    if host.startswith("*") and not host.startswith("*."):
        raise ValueError(f"wildcard host {host!r} must start with '*.'")
    return host


def ipv6_host(host: str) -> str | None:
    """`[::1]`, the form a Host header gives an IPv6 address in, for `::1`, `[::1]` or any
    other spelling of that address (`[0:0::1]`); None when `host` is no IPv6 literal."""
    inner = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if ":" not in inner:
        return None
    try:
        address = ipaddress.IPv6Address(inner)
    except ValueError:
        return None
    return f"[{address.compressed}]"


class Matcher:
    """The compiled route table of one runtime snapshot.

    Immutable once built, apart from a private cache of Host values (see ``_host_cache``).
    """

    def __init__(self, specs: Sequence[RouteSpec]) -> None:
        exact: dict[str, list[_Conditions]] = {}
        wildcard: dict[str, list[_Conditions]] = {}
        any_host: list[_Conditions] = []
        for index, spec in enumerate(specs):
            if not spec.paths:
                raise RouteSpecError(spec.name, "paths", f"route {spec.name!r} has no paths")
            texts = tuple(dict.fromkeys(spec.paths))
            try:
                patterns = [_Pattern(text) for text in texts if not text.startswith(REGEX_MARK)]
                regexes = [
                    (text, compile_path_regex(text))
                    for text in texts
                    if text.startswith(REGEX_MARK)
                ]
            except ValueError as exc:
                raise RouteSpecError(spec.name, "paths", str(exc)) from None
            try:
                hosts = tuple(dict.fromkeys(map(_host_key, spec.hosts))) if spec.hosts else ("*",)
            except ValueError as exc:
                raise RouteSpecError(spec.name, "hosts", str(exc)) from None
            for host in hosts:
                if host == "*":
                    group = any_host
                elif host.startswith("*."):
                    group = wildcard.setdefault(host[1:], [])
                else:
                    group = exact.setdefault(host, [])
                group.extend(_Candidate(spec, index, host, pattern) for pattern in patterns)
                group.extend(
                    _RegexCandidate(spec, index, host, text, regex) for text, regex in regexes
                )
        self._route_count = len(specs)
        self._exact = {host: _Bucket(c) for host, c in sorted(exact.items())}
        # Keyed by ".example.com"; probed from the longest suffix of the request host down.
        self._wildcard = {
            suffix: _Bucket(c)
            for suffix, c in sorted(wildcard.items(), key=lambda item: (-len(item[0]), item[0]))
        }
        self._any = _Bucket(any_host)
        # the fields some route matches on, as lower-case bytes, and their underscore
        # spellings: the exchange refuses a request that sends one twice with two values and
        # drops the spellings (see exchange._check_routing_fields)
        self.routing_fields = frozenset(
            name.lower().encode("latin-1") for spec in specs for name, _ in spec.headers or ()
        )
        self.routing_field_spellings = frozenset(underscore_spellings(self.routing_fields))
        self._has_hosts = bool(self._exact or self._wildcard)
        # Host header value -> its buckets. Clients reuse a handful of Host values, and the
        # lookup below costs ~1.3 µs (port strip, suffix probes) against ~0.06 µs for the cache.
        # Bounded: Host is client-controlled, so the cache is dropped when it fills up.
        self._host_cache: dict[str, tuple[_Bucket, ...]] = {}
        # Routes found, by method and then by path (host and path when some route names
        # hosts), as Kong's router caches its matches: a request for a path seen recently
        # costs two lookups instead of the walk (~0.3 µs). Only where no route matches on a
        # header field (the answer then depends on the request's fields too), and only
        # matches: a 404 or 405 is cheap enough, and a scan of random paths would fill it.
        # Bounded like the Host cache. The Match is shared by the requests it answers: its
        # `params` are read, never changed (as the exchange's empty default is shared).
        self._cache_matches = not self.routing_fields
        self._matches: dict[str, dict[object, Match]] = {}

    def match(self, host: str, method: str, path: str, header: HeaderLookup) -> Match | NoMatch:
        """Return the best route for a request, or ``NoMatch`` (404, or 405 with methods).

        ``host`` is the lower-cased Host header (a port is ignored), ``path`` the normalised
        path, and ``header(name)`` looks up a request header by lower-case name.
        """
        if not self._cache_matches:
            return self._match(host, method, path, header)
        cache = self._matches.get(method)
        if cache is None:
            cache = self._matches[method] = {}
        key: object = (host, path) if self._has_hosts else path
        found = cache.get(key)
        if found is not None:
            return found
        result = self._match(host, method, path, header)
        if isinstance(result, Match):
            if len(cache) >= _MATCH_CACHE_SIZE:
                cache.clear()
            cache[key] = result
        return result

    def _match(self, host: str, method: str, path: str, header: HeaderLookup) -> Match | NoMatch:
        segments = path.split("/")
        allowed: set[str] = set()
        if self._has_hosts:
            buckets = self._host_cache.get(host)
            if buckets is None:
                buckets = self._host_buckets(host)
            for bucket in buckets:
                found = bucket.find(method, path, segments, header, allowed)
                if found is not None:
                    return found
        found = self._any.find(method, path, segments, header, allowed)
        if found is not None:
            return found
        return NoMatch(frozenset(allowed)) if allowed else _NOT_FOUND

    def other_routes(
        self, host: str, method: str, path: str, header: HeaderLookup, found: Match
    ) -> list[Match]:
        """The other routes `path` selects when read as many back ends read it (``%2F`` or
        ``%5C`` a separator, no ``;`` parameters: see ``other_readings``). The back end
        would serve such a route's path under `found`'s plugins: ``/admin%2Fusers`` matched
        the open ``/`` next to a protected ``/admin``, and Werkzeug served ``/admin/users``
        (the exchange refuses that unless the other route's plugins are all `found`'s). A
        reading no route matches is no way around one."""
        others = []
        for other in other_readings(path):
            alternative = self.match(host, method, other, header)
            if isinstance(alternative, Match) and alternative.spec is not found.spec:
                others.append(alternative)
        return others

    def _host_buckets(self, host: str) -> tuple[_Bucket, ...]:
        """Buckets for ``host``, most specific first: exact, then wildcards longest first."""
        key = host
        host = host_name(host)
        if host.endswith("."):
            host = host[:-1]
        if host.startswith("["):  # an IPv6 address, however spelled, as the routes key it
            host = ipv6_host(host) or host
        buckets: list[_Bucket] = []
        bucket = self._exact.get(host)
        if bucket is not None:
            buckets.append(bucket)
        if self._wildcard:
            dot = host.find(".", 1)  # "*.example.com" needs a non-empty label before the suffix
            while dot != -1:
                bucket = self._wildcard.get(host[dot:])
                if bucket is not None:
                    buckets.append(bucket)
                dot = host.find(".", dot + 1)
        if len(self._host_cache) >= _HOST_CACHE_SIZE:
            self._host_cache.clear()
        result = self._host_cache[key] = tuple(buckets)
        return result

    def table(self) -> list[dict[str, object]]:
        """The compiled table in priority order, one row per (route, host, path pattern)."""
        buckets = [*self._exact.values(), *self._wildcard.values(), self._any]
        return [_row(c) for bucket in buckets for c in bucket.candidates]

    def __repr__(self) -> str:
        hosts = len(self._exact) + len(self._wildcard)
        return f"<Matcher {self._route_count} routes, {hosts} hosts>"


def _row(candidate: _Conditions) -> dict[str, object]:
    methods = candidate.methods
    if isinstance(candidate, _Candidate):
        kind = "exact" if candidate.exact else "prefix"
    else:
        priority = candidate.spec.regex_priority
        kind = f"regex,priority={priority}" if priority else "regex"
    return {
        "name": candidate.spec.name,
        "host": candidate.host,
        "methods": ",".join(sorted(methods)) if methods is not None else "*",
        "path": candidate.pattern,
        "kind": kind,
        "headers": ",".join(f"{n}={v}" for n, v in candidate.headers or ()),
    }
