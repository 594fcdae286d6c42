"""The admin API's OpenAPI document against the API itself."""

from __future__ import annotations

from apigate.admin.openapi import openapi_document


def test_every_operation_says_it_may_answer_401() -> None:
    # every admin endpoint asks for the token when one is set (README, Admin API); only the
    # dashboard's page and assets do not, and they are not in the document
    missing = [
        f"{method.upper()} {path}"
        for path, operations in openapi_document()["paths"].items()
        for method, operation in operations.items()
        if "401" not in operation["responses"]
    ]
    assert missing == []
