"""deploy/: the Prometheus scrape config parses, and every metric the Grafana dashboard
queries is a series the lab server or the router exports (a renamed metric would leave a
panel silently empty). ``test_router.py`` repeats the check against live servers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from servinglab.serving.metrics import ServerMetrics
from servinglab.serving.router_state import ROUTER_METRICS, RouterMetrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
NAME = re.compile(r"\b((?:vllm:|router_)[a-zA-Z0-9_:]*)")


def dashboard_metric_names() -> set[str]:
    """Every ``vllm:*`` / ``router_*`` series named in the dashboard's queries."""
    dash = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert exprs, "the dashboard has no queries"
    return {m for e in exprs for m in NAME.findall(e)}


def exported_series(text: str) -> set[str]:
    """Sample names in a /metrics text (``*_total``, ``*_bucket`` and so on, as queries use them)."""
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_prometheus_config_scrapes_router_and_backends():
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert set(jobs) == {"servinglab-router", "servinglab-backends"}
    assert all(j["metrics_path"] == "/metrics" for j in jobs.values())
    assert len(jobs["servinglab-backends"]["static_configs"][0]["targets"]) == 3


def test_dashboard_names_are_exported():
    server = exported_series(generate_latest(ServerMetrics("smol").registry).decode())
    router = exported_series(generate_latest(RouterMetrics(["http://127.0.0.1:1"]).registry).decode())
    used = dashboard_metric_names()
    missing = sorted(used - server - router)
    assert not missing, f"the dashboard queries series nobody exports: {missing}"
    assert {n for n in used if n.startswith("router_")}, "the dashboard shows the router too"
    families = {f.name for f in text_string_to_metric_families(generate_latest(RouterMetrics(["x"]).registry).decode())}
    assert {n.removesuffix("_total") for n in ROUTER_METRICS} <= families, "ROUTER_METRICS lists what the router exports"
