"""serve_app's HAProxy rules at work in the HAProxy binary Ray ships, with no Ray cluster.

The replay (serve_app/haproxy_replay.py): load_tests/haproxy_replay.py for a few seconds, with
Ray's settings and with serve_app's, in front of a backend that closes every request's first
attempt unanswered (the benchmark's serve_app row reads serve_app's settings and rewrites its
config with serve_app's function).

The edge shedding (serve_app/haproxy_shedding.py): through serve_app's wrapper, as Ray runs it,
in front of two slow servers.
"""

import asyncio
import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from load_tests import haproxy_replay as bench
from serve_app import haproxy_errors, haproxy_replay, haproxy_shedding
from serve_app.launch import free_ports

pytestmark = [pytest.mark.timeout(180)]

VARIANTS = {variant[0]: variant for variant in bench.VARIANTS}


def test_serve_apps_settings_replay_what_rays_drop():
    from ray.serve._private.haproxy import get_haproxy_binary

    binary = get_haproxy_binary()
    rays = bench.measure(VARIANTS["Ray's defaults (16 KiB, conn-failure)"], binary, 20, 10)
    ours = bench.measure(VARIANTS["+ wait-for-body (serve_app)"], binary, 20, 10)
    small, large = bench.UPLOADS[0], bench.UPLOADS[-1]
    assert rays[f"{small}"] == {"502": 20}, rays  # every first attempt lost
    assert ours[f"{small}"] == {"200": 20}, ours  # every one replayed and served
    assert ours[f"{bench.UPLOADS[1]}"] == {"200": 20}, ours  # 900 KB: still fits the buffer
    assert "200" not in ours[f"{large}"], ours  # 3 MB: over the buffer, not replayed


def test_past_admit_per_server_haproxy_answers_the_json_503_at_once(tmp_path):
    """Two servers, ``admit`` 3: of 10 concurrent POSTs 6 are served and 4 refused at once with
    the ingress's JSON body and Retry-After, /v2 in its own shape; a GET is never refused."""
    from ray.serve._private.haproxy import get_haproxy_binary

    front, *backs = free_ports(3)
    config = tmp_path / "haproxy.cfg"
    config.write_text(f"""global
    maxconn 100
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend f
    bind 127.0.0.1:{front}
    default_backend http-serve_app
backend http-serve_app
    http-reuse always
    server a 127.0.0.1:{backs[0]}
    server b 127.0.0.1:{backs[1]}
""")
    wrapper = haproxy_errors.install(tmp_path / "pages", get_haproxy_binary())
    env = {**os.environ, haproxy_shedding.LIMITS_ENV: json.dumps(
        {"http-serve_app": {"admit": 3, "retry_after_s": 2}})}
    procs = [subprocess.Popen([sys.executable, "-c", bench.BACKEND, str(port), "1.0", "0"])
             for port in backs]
    procs.append(subprocess.Popen([str(wrapper), "-f", str(config)], env=env))
    try:
        time.sleep(1.5)
        rewritten = config.read_text()  # by the wrapper, before HAProxy read it
        assert rewritten.index(haproxy_shedding.MARK) < rewritten.index(haproxy_replay.MARK)

        async def burst(path: str) -> tuple[list, httpx.Response]:
            """10 POSTs at once, and a GET while the backend is full."""
            async with httpx.AsyncClient(timeout=20) as client:
                async def one():
                    started = time.monotonic()
                    r = await client.post(f"http://127.0.0.1:{front}{path}", content=b"x")
                    return r, time.monotonic() - started

                async def get():
                    await asyncio.sleep(0.3)
                    return await client.get(f"http://127.0.0.1:{front}/readyz")
                *answers, got = await asyncio.gather(*(one() for _ in range(10)), get())
                return answers, got

        for path, body in (("/v1/classify", {"error": {"code": "overloaded",
                                                         "message": haproxy_shedding.MESSAGE}}),
                           ("/v2/models/m/infer", {"error": haproxy_shedding.MESSAGE})):
            answers, got = asyncio.run(burst(path))
            assert got.status_code == 200  # a GET (health, metadata) is never shed
            served = [r for r, _ in answers if r.status_code == 200]
            refused = [(r, s) for r, s in answers if r.status_code == 503]
            assert len(served) == 6 and len(refused) == 4, [r.status_code for r, _ in answers]
            for r, seconds in refused:
                assert r.json() == body and r.headers["retry-after"] == "2"
                assert r.headers["content-type"] == "application/json"
                assert seconds < 0.9  # at once, not after the 1 s the servers take
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)
