"""A tiny service that registers itself with apigate.

    python examples/hello_service.py --port 9001 --admin http://127.0.0.1:8001

It answers every GET with `{"message": "Hello from the Service!", "instance": NAME}`, registers
at start through `apigate.registration`, heartbeats in the background, and on SIGTERM first
deregisters (so the gateway stops sending it new requests), finishes what it is serving, then
exits. Standard library only, apart from the registration helper.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from apigate.registration import SyncRegistration


def make_handler(name: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, so the gateway can pool connections

        def do_GET(self) -> None:
            if self.path == "/health":
                body = b'{"status": "ok"}'
            else:
                body = json.dumps(
                    {"message": "Hello from the Service!", "instance": name, "path": self.path}
                ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # quiet: the gateway's access log shows the traffic

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", default=None, help="instance id (default: host-port)")
    parser.add_argument("--service", default="hello")
    parser.add_argument("--admin", default="http://127.0.0.1:8001", help="gateway admin API")
    parser.add_argument("--ttl", type=float, default=6.0)
    args = parser.parse_args(argv)

    server = ThreadingHTTPServer((args.host, args.port), make_handler(args.name or "?"))
    server.daemon_threads = True
    port = server.server_address[1]
    name = args.name or f"{args.host}-{port}"
    server.RequestHandlerClass = make_handler(name)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    registration = SyncRegistration(
        args.admin, args.service, url=f"http://{args.host}:{port}", instance_id=name, ttl=args.ttl
    )
    registered = registration.start()
    print(
        f"hello_service {name} listening on {args.host}:{port} "
        f"({'registered' if registered else 'not yet registered'})",
        flush=True,
    )

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    registration.stop()  # deregister first: the gateway drains us
    time.sleep(0.3)  # let requests already on their way finish
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
