"""serve_app/haproxy_shedding.py: the limits come from the config as the ingress counts them,
and the rules land in the app's own backend of Ray's config, once. No Ray cluster; the rules
at work in a real HAProxy: tests/integration/test_haproxy_rules.py."""

import json

from serve_app import configfile, haproxy_config, haproxy_shedding
from serve_app.config import parse_app_config
from tests.conftest import CONFIGS

RAY_LIKE = """defaults
    mode http
backend default_backend
    http-request return status 404 content-type text/plain lf-string "not found"
backend http-serve_app
    log global
    http-reuse always
    server SERVE_REPLICA_serve_app-Ingress-a 127.0.0.1:20000 check
    server SERVE_PROXY_ACTOR-fallback 127.0.0.1:60859 check backup
backend http-serve_app-via-ingress-request-router
    http-reuse always
backend http-other
    http-reuse always
listen stats
    bind :8404
"""


def test_admitted_counts_the_queued_and_the_in_flight_images_of_every_model():
    one = parse_app_config({"dispatch": {"max_queued": 64, "max_in_flight": 2,
                                         "max_batch_size": 16}})
    assert haproxy_shedding.admitted_per_ingress(one) == 64 + 2 * 16
    two = parse_app_config({"models": [{"name": "efficientnet_lite0"},
                                       {"name": "efficientnet_lite0", "served_name": "b"}],
                            "dispatch": {"max_queued": 10, "max_in_flight": 3,
                                         "max_batch_size": 4}})
    assert haproxy_shedding.admitted_per_ingress(two) == 2 * (10 + 3 * 4)


def test_the_shipped_configs_limits():
    local = haproxy_shedding.limits(configfile.load(CONFIGS / "local.yaml"))
    assert local == {"http-serve_app": {"admit": 96, "retry_after_s": 1}}
    multi = haproxy_shedding.limits(configfile.load(CONFIGS / "multi-model.yaml"))
    assert multi["http-serve_app"]["admit"] == 2 * 96


def test_backend_names_are_rays():
    from ray.serve._private.haproxy import HAProxyManager

    for app in ("serve_app", "My App#2", "a/b", "x.y-z"):
        assert haproxy_config.backend_name(app) == HAProxyManager.get_safe_name(f"http-{app}")


def test_rules_go_into_that_apps_backend_only_and_once(tmp_path):
    pages = haproxy_shedding.pages(tmp_path)
    limits = {"http-serve_app": {"admit": 96, "retry_after_s": 2}}
    out = haproxy_shedding.shed_requests(RAY_LIKE, limits, pages)
    assert haproxy_shedding.shed_requests(out, limits, pages) == out  # a reload adds nothing
    sections = {s.split("\n", 1)[0]: s for s in out.split("\nbackend ")}
    ours = sections["http-serve_app"]
    assert "nbsrv,mul(96)" in ours and "hdr Retry-After 2" in ours
    assert f"file {pages['v1']}" in ours and f"file {pages['v2']}" in ours
    assert ours.index(haproxy_shedding.MARK) < ours.index("server SERVE_REPLICA")
    assert out.count(haproxy_shedding.MARK) == 1  # not the router's backend, not http-other
    added = [line for line in out.splitlines() if line not in RAY_LIKE.splitlines()]
    assert added[0] == f"    # {haproxy_shedding.MARK}", added
    assert len(added) == 4 and all(line.startswith("    ") for line in added), added
    assert "\n".join(line for line in out.splitlines() if line not in added) + "\n" == RAY_LIKE
    assert haproxy_shedding.shed_requests(RAY_LIKE, {}, pages) == RAY_LIKE


def test_the_pages_are_the_ingress_overloaded_bodies():
    bodies = {k: json.loads(v) for k, v in haproxy_shedding.page_bodies().items()}
    assert bodies["v1"]["error"]["code"] == "overloaded"
    assert bodies["v2"] == {"error": haproxy_shedding.MESSAGE}


def test_runner_sets_the_limits_of_the_config_it_serves(tmp_path, monkeypatch, capsys):
    from serve_app import haproxy_errors, runner

    monkeypatch.setattr(haproxy_errors, "install", lambda d: tmp_path / "haproxy")
    config = configfile.load(CONFIGS / "local.yaml")
    env = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}
    runner.configure_haproxy(env, config)
    assert json.loads(env[haproxy_shedding.LIMITS_ENV]) == haproxy_shedding.limits(config)
    chosen = {"RAY_SERVE_ENABLE_HA_PROXY": "1", haproxy_shedding.LIMITS_ENV: "{}"}
    runner.configure_haproxy(chosen, config)
    assert chosen[haproxy_shedding.LIMITS_ENV] == "{}"  # the caller's choice: shed nothing
    config["applications"][0]["args"]["dispatch"]["max_queued"] = -1
    broken = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}
    runner.configure_haproxy(broken, config)
    assert haproxy_shedding.LIMITS_ENV not in broken
    assert "max_queued" in capsys.readouterr().err
    off = {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    runner.configure_haproxy(off, configfile.load(CONFIGS / "local.yaml"))
    assert haproxy_shedding.LIMITS_ENV not in off


def test_the_message_is_the_one_the_ingress_sends_when_ray_pushes_back():
    import inspect

    from serve_app.api import common

    assert f'"overloaded", "{haproxy_shedding.MESSAGE}"' in inspect.getsource(common)
