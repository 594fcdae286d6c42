"""Call the gateway with and without a signed JWT.

    APIGATE_DEMO_JWT_SECRET=... python examples/client.py [--url http://127.0.0.1:8080]

It signs an HS256 token for the consumer `alice` (issuer `apigate-demo`) with the secret the
gateway's `jwt` plugin checks, then calls `/secure/hello_service` without a token (401), with it
(200), and in a quick burst past the route's rate limit (429s).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request

import jwt


def make_token(secret: str, subject: str = "alice", ttl: int = 300) -> str:
    now = int(time.time())
    claims = {"sub": subject, "iss": "apigate-demo", "iat": now, "exp": now + ttl}
    return jwt.encode(claims, secret, algorithm="HS256")


def call(url: str, token: str | None = None) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--burst", type=int, default=8)
    args = parser.parse_args(argv)
    secret = os.environ.get("APIGATE_DEMO_JWT_SECRET")
    if not secret:
        print("set APIGATE_DEMO_JWT_SECRET to the gateway's JWT secret", file=sys.stderr)
        return 2
    url = args.url.rstrip("/") + "/secure/hello_service"
    status, body = call(url)
    print(f"without a token: {status} {body.get('error', '')}")
    token = make_token(secret)
    status, body = call(url, token)
    print(f"with a signed token: {status} {body.get('message', body.get('error', ''))}")
    statuses = [call(url, token)[0] for _ in range(args.burst)]
    print(f"a burst of {args.burst}: " + " ".join(str(s) for s in statuses))
    return 0


if __name__ == "__main__":
    sys.exit(main())
