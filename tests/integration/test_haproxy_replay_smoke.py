"""load_tests/haproxy_replay.py for a few seconds: Ray's HAProxy binary, with Ray's settings
and with serve_app's (serve_app/haproxy_replay.py), in front of a backend that closes every
request's first attempt unanswered (the benchmark's serve_app row reads serve_app's settings and
rewrites its config with serve_app's function). No Ray cluster: the claim the replay rests on,
checked on the binary Ray ships."""

import pytest

from load_tests import haproxy_replay as bench

pytestmark = [pytest.mark.timeout(180)]

VARIANTS = {variant[0]: variant for variant in bench.VARIANTS}


def test_serve_apps_settings_replay_what_rays_drop():
    from ray.serve._private.haproxy import get_haproxy_binary

    binary = get_haproxy_binary()
    rays = bench.measure(VARIANTS["Ray's defaults (16 KiB, conn-failure)"], binary, 20, 10)
    ours = bench.measure(VARIANTS["+ http-buffer-request (serve_app)"], binary, 20, 10)
    small, large = bench.UPLOADS[0], bench.UPLOADS[-1]
    assert rays[f"{small}"] == {"502": 20}, rays  # every first attempt lost
    assert ours[f"{small}"] == {"200": 20}, ours  # every one replayed and served
    assert ours[f"{bench.UPLOADS[1]}"] == {"200": 20}, ours  # 900 KB: still fits the buffer
    assert "200" not in ours[f"{large}"], ours  # 3 MB: over the buffer, not replayed
