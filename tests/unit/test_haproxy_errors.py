"""serve_app/haproxy_errors.py: HAProxy's 502/503/504 as serve_app's JSON with their status,
through a wrapper that rewrites Ray's config and execs the real binary. No Ray cluster."""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

from serve_app import haproxy_errors


def _parse(page: bytes) -> tuple[str, dict, bytes]:
    head, body = page.split(b"\r\n\r\n", 1)
    status, *lines = head.decode().split("\r\n")
    return status, dict(line.split(": ", 1) for line in lines), body


def test_each_page_is_a_whole_http_response_with_the_json_error():
    for status, (code, _, retry_after) in haproxy_errors.PAGES.items():
        line, headers, body = _parse(haproxy_errors.error_page(status))
        assert line.startswith(f"HTTP/1.1 {status} ")
        assert headers["Content-Type"] == "application/json"
        assert int(headers["Content-Length"]) == len(body)
        assert json.loads(body)["error"]["code"] == code
        assert headers.get("Retry-After") == (None if retry_after is None else str(retry_after))
    assert _parse(haproxy_errors.error_page(503))[1]["Retry-After"] == "1"


def test_rays_template_still_points_all_three_at_one_500_file():
    """The premise: if Ray changes how it writes these lines, this fails first."""
    from ray.serve._private import haproxy, haproxy_templates

    template = inspect.getsource(haproxy_templates)
    for status in (502, 503, 504):
        assert f"errorfile {status} {{{{ config.error_file_path }}}}" in template
    assert "500 Internal Server Error" in inspect.getsource(haproxy)


RAY_LIKE = """defaults
    mode http
    # Normalize 502/503/504 to 500 per Serve's default behavior.
    errorfile 502 /tmp/haproxy-serve/500.http
    errorfile 503 /tmp/haproxy-serve/500.http
    errorfile 504 /tmp/haproxy-serve/500.http
    balance leastconn
"""


def test_rewrite_points_each_status_at_its_page(tmp_path):
    pages = haproxy_errors.page_paths(tmp_path)
    out = haproxy_errors.rewrite_config(RAY_LIKE, pages)
    for status in (502, 503, 504):
        assert f"    errorfile {status} {tmp_path}/{status}.http" in out.splitlines()
    assert "500.http" not in out and "balance leastconn" in out
    assert haproxy_errors.rewrite_config(out, pages) == out  # a reload rewrites nothing


def test_the_wrapper_rewrites_the_config_then_becomes_the_real_binary(tmp_path):
    fake = tmp_path / "real-haproxy"  # records what it was run with, as HAProxy would read it
    fake.write_text("#!/bin/sh\necho \"pid=$$ args=$*\" > \"$(dirname \"$0\")/ran\"\n"
                    "cat \"$3\" >> \"$(dirname \"$0\")/ran\"\n")
    fake.chmod(0o755)
    wrapper = haproxy_errors.install(tmp_path / "pages", str(fake))
    assert os.access(wrapper, os.X_OK)
    config = tmp_path / "haproxy.cfg"
    config.write_text(RAY_LIKE)
    env = {**os.environ, "PYTHONPATH": str(Path(haproxy_errors.__file__).parents[1])}
    proc = subprocess.run([str(wrapper), "-db", "-f", str(config), "-sf", "123"], env=env,
                          timeout=30)
    assert proc.returncode == 0
    ran = (tmp_path / "ran").read_text()
    assert f"args=-db -f {config} -sf 123" in ran  # same arguments, in order
    assert f"errorfile 503 {tmp_path}/pages/503.http" in ran and "500.http" not in ran
    for status in (502, 503, 504):
        page = (tmp_path / "pages" / f"{status}.http").read_bytes()
        assert page == haproxy_errors.error_page(status)
    assert sys.executable in wrapper.read_text()


def test_runner_installs_the_wrapper_only_in_haproxy_mode_and_never_over_a_choice(tmp_path,
                                                                                 monkeypatch):
    from serve_app import runner

    monkeypatch.setattr(haproxy_errors, "install", lambda d: tmp_path / "haproxy")
    env = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}
    runner.configure_haproxy(env)
    assert env[haproxy_errors.BINARY_ENV] == str(tmp_path / "haproxy")
    chosen = {"RAY_SERVE_ENABLE_HA_PROXY": "1", haproxy_errors.BINARY_ENV: "/opt/haproxy"}
    runner.configure_haproxy(chosen)
    assert chosen[haproxy_errors.BINARY_ENV] == "/opt/haproxy"
    off = {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    runner.configure_haproxy(off)
    assert haproxy_errors.BINARY_ENV not in off


def test_make_run_drains_a_stopping_ingress_for_5_s_not_rays_30(tmp_path, monkeypatch):
    """HAProxy is the only way in, and it drops a stopping replica at its next reload: Ray's
    30 s wait for an external load balancer is paid by every rollout and stop for nothing."""
    from serve_app import runner
    from serve_app.launch import RAY_CLUSTER_ENV

    drain = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
    monkeypatch.setattr(haproxy_errors, "install", lambda d: tmp_path / "haproxy")
    env = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}
    runner.configure_haproxy(env)
    assert env[drain] == RAY_CLUSTER_ENV[drain] == "5"
    chosen = {"RAY_SERVE_ENABLE_HA_PROXY": "1", drain: "30"}
    runner.configure_haproxy(chosen)
    assert chosen[drain] == "30"
