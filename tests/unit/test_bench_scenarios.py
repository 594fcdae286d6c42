"""bench/scenarios.py: every scenario hands apigate a config it accepts, and the nginx side
of the ones that log writes the log (no sockets: the specs only; bench/run.py runs them)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from apigate.config import load_config
from tests.support.bench import bench_module

scenarios: ModuleType = bench_module("scenarios")


def env(tmp_path: Path) -> object:
    return scenarios.Env(proxy_port=18080, upstream_port=18081, workdir=tmp_path)


@pytest.mark.parametrize("name", sorted(scenarios.SCENARIOS))
def test_every_scenario_gives_apigate_a_valid_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv("APIGATE_BENCH_REDIS", "redis://127.0.0.1:6379/0")
    spec = scenarios.SCENARIOS[name](env(tmp_path))
    path = tmp_path / "apigate.yaml"
    path.write_text(spec.apigate_yaml)
    config = load_config(path)
    assert config.routes, name
    assert "location" in spec.nginx_server


def test_logged_both_logs_on_both_proxies_and_logged_on_apigate_only(tmp_path: Path) -> None:
    log = str(tmp_path / "access.log")
    logged = scenarios.SCENARIOS["logged"](env(tmp_path))
    both = scenarios.SCENARIOS["logged_both"](env(tmp_path))
    assert both.apigate_yaml == logged.apigate_yaml
    assert log in logged.apigate_yaml
    assert "access_log" not in logged.nginx_server  # the yardstick: nginx logs nothing
    assert f"access_log {log} apigate_json buffer=64k flush=1s;" in both.nginx_server
    assert "log_format apigate_json escape=json" in both.nginx_http
