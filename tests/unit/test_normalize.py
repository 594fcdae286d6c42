"""normalize_path: one canonical spelling of a request path, or None for a 400."""

from __future__ import annotations

import timeit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apigate.routing.normalize import is_canonical, normalize_path, other_readings


@pytest.mark.parametrize(
    "raw",
    ["/", "/hello_service", "/hello_service/", "/api/42/orders", "/a-b_c~d", "/a:b@c!$&'()*+,;="],
)
def test_canonical_paths_come_back_unchanged(raw: str) -> None:
    assert normalize_path(raw) is raw


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/%7Euser", "/~user"),
        ("/%7euser", "/~user"),
        ("/%41%62%63", "/Abc"),
        ("/a%2db%2Ec%5fd", "/a-b.c_d"),
        ("/a%2fb", "/a%2Fb"),  # stays encoded: data, not a separator
        ("/a%2Fb", "/a%2Fb"),
        ("/caf%c3%a9", "/caf%C3%A9"),
        ("/a%20b", "/a%20b"),
        ("/100%25", "/100%25"),
        ("/%3f%23", "/%3F%23"),
    ],
)
def test_percent_escapes(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/a/./b/../c", "/a/c"),
        ("/a/b/c/./../../g", "/a/g"),
        ("/a/b/..", "/a/"),
        ("/a/b/.", "/a/b/"),
        ("/a/.", "/a/"),
        ("/.", "/"),
        ("/..", "/"),
        ("/../../etc/passwd", "/etc/passwd"),
        ("/public/../admin", "/admin"),
        ("/a/...", "/a/..."),  # three dots are a name, not a dot segment
        ("/a/.hidden", "/a/.hidden"),
        ("/.well-known/x", "/.well-known/x"),
        ("/a//b", "/a/b"),
        ("//a///b//", "/a/b/"),
        ("//", "/"),
        ("/a//../b", "/b"),
    ],
)
def test_dot_segments_and_repeated_slashes(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/%2e%2e/admin", "/admin"),
        ("/public/%2E%2E/admin", "/admin"),
        ("/public/.%2e/admin", "/admin"),
        ("/public/%2e./admin", "/admin"),
        ("/public/%2e/admin", "/public/admin"),
        ("/%2e%2e/%2e%2e/etc/passwd", "/etc/passwd"),
        ("/public/%2e%2e%2fadmin", "/public/..%2Fadmin"),  # one segment; %2F is not a "/"
    ],
)
def test_encoded_traversal_is_resolved(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "hello",
        "*",
        "http://example.com/",
        "/%zz",
        "/%4",
        "/%",
        "/a%",
        "/%g1",
        "/%1g",
        "/a\x00b",
        "/a\nb",
        "/a\rb",
        "/a\tb",
        "/a\x7fb",
        "/a b",
        "/a\\b",
        "/..\\admin",
        "/caf\u00e9",
        # an encoded NUL: back ends that decode the path cut it there (nginx answers 400 too)
        "/x%00",
        "/a%00.php/b",
    ],
)
def test_invalid_paths_give_none(raw: str) -> None:
    assert normalize_path(raw) is None


@given(st.text(alphabet="/.%2eEfF0a~-_\\", max_size=24).map(lambda s: "/" + s))
def test_result_is_canonical_and_stable(raw: str) -> None:
    normalised = normalize_path(raw)
    if normalised is None:
        return
    assert normalize_path(normalised) == normalised
    assert normalised.startswith("/")
    assert "//" not in normalised
    segments = normalised.split("/")
    assert "." not in segments
    assert ".." not in segments


@pytest.mark.parametrize(
    "raw", [b"/", b"/hello_service/", b"/api/42/orders", b"/a-b_c~d", b"/a:b@c!$&'()*+,=", b"/a.b"]
)
def test_is_canonical_takes_the_usual_paths(raw: bytes) -> None:
    assert is_canonical(raw)


@pytest.mark.parametrize(
    "raw",
    [b"", b"a", b"*", b"//", b"/a//b", b"/.", b"/a/./b", b"/a/..", b"/%41", b"/a b", b"/a\\b"]
    + [b"/a;b", b"/a/..;/b"]  # (";": a reading without the parameter, see other_readings)
    + [b"/a" + bytes([c]) for c in (*range(32), 127, 128, 255)],
)
def test_is_canonical_leaves_the_rest_to_normalize_path(raw: bytes) -> None:
    assert not is_canonical(raw)


@given(st.binary(max_size=24).map(lambda b: b"/" + b) | st.binary(max_size=8))
def test_is_canonical_only_where_normalize_path_keeps_the_path(raw: bytes) -> None:
    """The connection skips normalize_path when is_canonical says so: it must never say so of
    a path that normalize_path would change or refuse, nor of one with another reading (the
    exchange then looks for no route of one)."""
    if is_canonical(raw):
        text = raw.decode("ascii")
        assert normalize_path(text) == text
        assert other_readings(text) == []


@given(st.text(alphabet="/.%2eEfF0a~-_\\ ", max_size=24).map(lambda s: "/" + s))
def test_is_canonical_agrees_with_normalize_path_on_path_characters(raw: str) -> None:
    if is_canonical(raw.encode()):
        assert normalize_path(raw) == raw


def test_fast_path_is_cheaper_than_the_full_pass() -> None:
    def per_call(path: str) -> float:
        runs = timeit.repeat(lambda: normalize_path(path), number=20_000, repeat=5)
        return min(runs) / 20_000 * 1e6

    fast = per_call("/api/v1/users/42/orders")
    full = per_call("/api/v1/users/%34%32/orders")
    print(f"\nnormalize_path: fast path {fast:.2f} µs, full pass {full:.2f} µs")
    assert fast < full


@pytest.mark.parametrize(
    ("path", "readings"),
    [
        ("/admin%2Fusers", ["/admin/users"]),
        ("/x/..%2Fadmin", ["/admin"]),
        ("/a%5Cb", ["/a/b"]),
        ("/admin;x", ["/admin"]),
        ("/x/..;/admin", ["/admin"]),
        ("/a;p=1/b;q/c", ["/a/b/c"]),
        ("/a%2F%2Fb", ["/a/b"]),
        # Tomcat drops the parameter, %2F and all, before it decodes: /admin; decoded
        # first, it is /admin;/.. = / (the diff review's way past a one-order reading)
        ("/admin;%2F..", ["/admin", "/"]),
        ("/admin;%2F..%2Fx/users", ["/admin/users", "/x/users"]),
        # read as they are
        ("/admin/users", []),
        ("/a%20b", []),
        ("/a%252Fb", []),  # %25 is "%": the back end decodes once, to "%2F"
    ],
)
def test_other_readings(path: str, readings: list[str]) -> None:
    """How WSGI/ASGI servers (%2F, %5C) and Tomcat (`;` parameters first) read a path."""
    assert other_readings(path) == readings
