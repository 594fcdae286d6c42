"""Shared state behind the gateway's features (ARCHITECTURE.md, "State and scale").

    config_store.py   admin-API changes kept over the file (memory or SQLite)
    redis.py          the async Redis client cluster features share (`store: redis://...`):
                      per-call timeouts, Lua scripts, outage bookkeeping
    redis_batch.py    the script calls of one event-loop tick sent as one pipeline
    cluster.py        the registrations and admin changes every node on one Redis shares
    cluster_scripts.py  its Redis keys and Lua scripts
    redis_config_store.py  the shared admin changes (the config store of `store: redis://`)

Submodules are imported by the features that need them, never here, so a gateway without
Redis does not pay for importing redis-py.
"""
