"""Self-test of prom_helpers: a real Prometheus scrapes itself, evaluates a query and a rule file."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.deploy.prom_helpers import (
    free_port,
    prometheus_binary,
    running_prometheus,
    self_scrape_config,
    start_prometheus,
)


def test_binary_present() -> None:
    assert prometheus_binary()


def test_prometheus_scrapes_itself_and_evaluates_rules(tmp_path: Path) -> None:
    rules = tmp_path / "self.rules.yml"
    rules.write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "self",
                        "rules": [
                            {"record": "selftest:up", "expr": 'max(up{job="prometheus"})'},
                            {"alert": "SelfTestAlwaysFiring", "expr": "vector(1)", "labels": {"severity": "info"}},
                        ],
                    }
                ]
            }
        )
    )
    port = free_port()
    config = self_scrape_config(port, rule_files=[rules])
    server = start_prometheus(config, workdir=tmp_path / "prom", port=port)
    try:
        server.wait_for_targets_up("prometheus", timeout=30)
        (sample,) = server.query('prometheus_build_info{job="prometheus"}')
        assert sample["metric"]["instance"] == f"127.0.0.1:{port}"
        assert server.wait_for("selftest:up == 1", timeout=30)
        assert server.query("1 + 1")[0]["value"][1] == "2"
        assert {t["labels"]["job"] for t in server.targets()} == {"prometheus"}
        assert [g["name"] for g in server.rules()] == ["self"]
        server.wait_for('ALERTS{alertname="SelfTestAlwaysFiring",alertstate="firing"}', timeout=30)
    finally:
        server.stop()
    assert server.process.returncode is not None


def test_context_manager_stops_the_server() -> None:
    with running_prometheus(["127.0.0.1:1"], job="unreachable") as prom:
        prom.wait_for('up{job="unreachable"} == 0', timeout=30)
        process = prom.process
    assert process.poll() is not None
