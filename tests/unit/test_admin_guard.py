"""The admin API's browser guard, without sockets: cross-site requests, bodies a page may
send without a preflight, and rebound host names are refused before anything runs."""

from __future__ import annotations

import pytest

from apigate.admin.guard import refuse_browser_attacks
from apigate.admin.http import AdminError, AdminRequest

_CONFIG = b'{"version": 1}'


def _req(headers: dict[str, str], body: bytes = b"", method: str = "POST") -> AdminRequest:
    return AdminRequest(method, "/config", {}, headers, body, "127.0.0.1")


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        # the review's page: a no-cors fetch with text/plain from another origin
        (
            {
                "host": "127.0.0.1:8001",
                "origin": "http://localhost:3000",
                "content-type": "text/plain",
            },
            _CONFIG,
            403,
        ),
        ({"host": "127.0.0.1:8001", "sec-fetch-site": "cross-site"}, b"", 403),
        ({"host": "localhost:8001", "sec-fetch-site": "same-site"}, b"", 403),  # another port
        ({"host": "127.0.0.1:8001", "origin": "null"}, b"", 403),  # a sandboxed frame
        ({"host": "127.0.0.1:8001", "content-type": "text/plain"}, _CONFIG, 415),
        (
            {"host": "127.0.0.1:8001", "content-type": "application/x-www-form-urlencoded"},
            b"a=1",
            415,
        ),
        # DNS rebinding: the attacker's name, resolved to 127.0.0.1
        ({"host": "attacker.example:8001"}, b"", 403),
        ({}, b"", 403),
    ],
)
def test_refused_without_a_token(headers: dict[str, str], body: bytes, status: int) -> None:
    with pytest.raises(AdminError) as err:
        refuse_browser_attacks(_req(headers, body), has_token=False)
    assert err.value.status == status


@pytest.mark.parametrize(
    "headers",
    [
        {"host": "127.0.0.1:8001", "content-type": "application/json"},  # curl, the CLI
        {"host": "localhost:8001", "content-type": "application/json; charset=utf-8"},
        {"host": "[::1]:8001", "content-type": "application/json"},
        {
            "host": "127.0.0.1:8001",
            "origin": "http://127.0.0.1:8001",  # the dashboard's own page
            "sec-fetch-site": "same-origin",
            "content-type": "application/json",
        },
        {"host": "127.0.0.1:8001", "sec-fetch-site": "none", "content-type": "application/json"},
        {"host": "127.0.0.1:8001"},  # a body without a type (as Docker's API takes it)
    ],
)
def test_allowed_without_a_token(headers: dict[str, str]) -> None:
    refuse_browser_attacks(_req(headers, _CONFIG), has_token=False)


def test_with_a_token_any_host_name_will_do_but_not_another_site() -> None:
    """An exposed listener is reached by its name; a page still cannot send cross-site."""
    named = {"host": "gateway-admin.internal:8001", "content-type": "application/json"}
    refuse_browser_attacks(_req(named, _CONFIG), has_token=True)
    with pytest.raises(AdminError):
        refuse_browser_attacks(_req({**named, "origin": "https://evil.example"}), has_token=True)
