"""serve_app/haproxy_replay.py: HAProxy replays a request its ingress dropped unanswered. The
settings reach Ray under the names it reads, and the rewrite of Ray's real config is one that
HAProxy accepts. No Ray cluster."""

import json
import os
import subprocess
import sys

from serve_app import haproxy_errors, haproxy_replay


def test_runner_sets_the_replay_unless_the_caller_chose_it(tmp_path, monkeypatch):
    from serve_app import runner

    monkeypatch.setattr(haproxy_errors, "install", lambda d: tmp_path / "haproxy")
    env = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}
    runner.configure_haproxy(env)
    assert env["RAY_SERVE_HAPROXY_RETRY_ON"] == "conn-failure empty-response"
    assert int(env["RAY_SERVE_HAPROXY_TUNE_BUFSIZE"]) >= 1 << 20  # a photo fits: replayable
    chosen = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure"}
    runner.configure_haproxy(chosen)
    assert chosen["RAY_SERVE_HAPROXY_RETRY_ON"] == "conn-failure"


def test_ray_reads_the_replay_settings_under_those_names():
    """Ray drops a setting it no longer knows silently: its HAProxy config must carry them."""
    code = ("import json; from ray.serve._private.haproxy import HAProxyConfig; "
            "c = HAProxyConfig(); print(json.dumps([c.retry_on, str(c.bufsize)]))")
    env = {**os.environ, **haproxy_replay.REPLAY_ENV}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert json.loads(out.splitlines()[-1]) == [
        haproxy_replay.REPLAY_ENV["RAY_SERVE_HAPROXY_RETRY_ON"],
        haproxy_replay.REPLAY_ENV["RAY_SERVE_HAPROXY_TUNE_BUFSIZE"]]


def test_runner_leaves_the_replay_off_outside_haproxy_mode():
    from serve_app import runner

    off = {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    runner.configure_haproxy(off)
    assert not set(haproxy_replay.REPLAY_ENV) & set(off)


_RENDER = """import sys
from pathlib import Path
from ray.serve._private.haproxy import (BackendConfig, HAProxyApi, HAProxyConfig, ServerConfig,
                                         get_haproxy_binary)
d = Path(sys.argv[1])
cfg = HAProxyConfig(socket_path=str(d / "admin.sock"), server_state_base=str(d),
                    server_state_file=str(d / "state"), error_file_path=str(d / "500.http"))
backend = BackendConfig(name="http-serve_app", path_prefix="/", app_name="serve_app",
                        servers=[ServerConfig(name="a", host="127.0.0.1", port=20000)],
                        fallback_server=ServerConfig(name="fb", host="127.0.0.1", port=20001))
HAProxyApi(cfg=cfg, backend_configs={"serve_app": backend},
           config_file_path=str(d / "haproxy.cfg"))._generate_config_file_internal()
print(get_haproxy_binary())
"""


def test_rays_real_config_waits_for_whole_bodies_in_the_apps_backend_and_haproxy_accepts_it(
        tmp_path):
    """Ray's template, rendered by Ray with serve_app's settings and one application, then
    rewritten as the wrapper does, then checked by the HAProxy binary Ray runs."""
    env = {**os.environ, **haproxy_replay.REPLAY_ENV}
    out = subprocess.run([sys.executable, "-c", _RENDER, str(tmp_path)], capture_output=True,
                         text=True, check=True, timeout=120, env=env).stdout
    binary = out.strip().splitlines()[-1]
    ray_config = (tmp_path / "haproxy.cfg").read_text()
    assert "wait-for-body" not in ray_config and "http-buffer-request" not in ray_config
    rewritten = haproxy_replay.buffer_requests(ray_config)
    assert haproxy_replay.buffer_requests(rewritten) == rewritten  # a reload adds nothing
    rule = haproxy_replay.wait_for_body(1 << 20)  # the buffer Ray was given
    assert "le 1048576 }" in rule
    backend = rewritten[rewritten.index("\nbackend http-serve_app\n"):].split("\nlisten", 1)[0]
    assert backend.count(f"    {rule}\n") == 1 and rewritten.count("wait-for-body") == 1
    added = [line for line in rewritten.splitlines() if line not in ray_config.splitlines()]
    assert added == [f"    # {haproxy_replay.MARK}", f"    {rule}"]
    path = tmp_path / "rewritten.cfg"
    path.write_text(rewritten)
    check = subprocess.run([binary, "-c", "-f", str(path)], capture_output=True, text=True,
                           timeout=30)
    assert check.returncode == 0, check.stderr
