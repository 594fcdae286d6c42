"""`apigate demo`, the README's first command, end to end in a subprocess."""

from __future__ import annotations

import asyncio
import sys


async def test_demo_tells_the_whole_story() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "apigate",
        "demo",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert proc.returncode == 0, text + err.decode()[-2000:]
    for line in (
        "hello-1     10",
        "hello-2     10",
        "hello-3     10",
        "no request failed; traffic moved",
        "without a token:      401",
        "with a signed token:  200",
        "OK: the demo ran as expected.",
        "cleaned up",
    ):
        assert line in text, line
    burst = next(x for x in text.splitlines() if "a burst of 8 more" in x).split(":")[1].split()
    assert burst[0] == "200" and "429" in burst
