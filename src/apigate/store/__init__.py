"""Shared state behind the gateway's features (ARCHITECTURE.md, "State and scale").

    config_store.py   admin-API changes kept over the file (memory or SQLite)
    redis.py          the async Redis client cluster features share (`store: redis://...`):
                      per-call timeouts, Lua scripts, outage bookkeeping
    redis_batch.py    the script calls of one event-loop tick sent as one pipeline

Submodules are imported by the features that need them, never here, so a gateway without
Redis does not pay for importing redis-py.
"""
