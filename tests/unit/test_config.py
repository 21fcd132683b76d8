"""Config validation: every mistake names its key; both shipped configs are valid."""

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app import configfile
from serve_app.__main__ import main as cli
from serve_app.config import ConfigError, parse_app_config, parse_classifier_settings

CONFIGS = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))


def test_defaults_serve_the_offline_model():
    cfg = parse_app_config({})
    assert cfg.primary.name == "efficientnet_lite0" and cfg.primary.weights == "DEFAULT"
    assert cfg.top_k_default == 5 and cfg.max_body_bytes == 10 * 1024 * 1024


@pytest.mark.parametrize("args,key,why", [
    ({"top_k_defualt": 3}, "args.top_k_defualt", "unknown key"),
    ({"model": {"nmae": "resnet18"}}, "args.model.nmae", "unknown key"),
    ({"top_k_default": 0}, "args.top_k_default", "greater than or equal to 1"),
    ({"top_k_default": 21}, "args.top_k_default", "less than or equal to 20"),
    ({"max_body_bytes": "lots"}, "args.max_body_bytes", "valid integer"),
    ({"model": {"name": "resnet9000"}}, "args.model.name", "unknown model 'resnet9000'"),
    ({"model": {"name": "resnet50", "weights": "IMAGENET1K_V9"}}, "args.model.weights",
     "IMAGENET1K_V9"),
    ({"model": {"name": "efficientnet_lite0", "weights": "IMAGENET1K_V1"}}, "args.model.weights",
     "only DEFAULT"),
    ({"model": {"weights_path": "/nonexistent/w.pth"}}, "args.model.weights_path", "no such file"),
    ({"model": {"dtype": "float8"}}, "args.model.dtype", "float32"),
])
def test_bad_args_name_the_key(args, key, why):
    with pytest.raises(ConfigError) as info:
        parse_app_config(args)
    message = str(info.value)
    assert f"{key}:" in message and why in message, message


def test_weights_path_expands_environment_variables(tmp_path, monkeypatch):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    monkeypatch.setenv("MY_WEIGHTS_DIR", str(tmp_path))
    cfg = parse_app_config({"model": {"name": "resnet18", "weights_path": "$MY_WEIGHTS_DIR/w.pth"}})
    assert cfg.primary.weights_path == str(weights)
    monkeypatch.delenv("MY_WEIGHTS_DIR")
    with pytest.raises(ConfigError, match="args.model.weights_path: .*unset environment variable"):
        parse_app_config({"model": {"weights_path": "$MY_WEIGHTS_DIR/w.pth"}})


def test_classifier_user_config_is_validated():
    assert parse_classifier_settings({"max_batch_size": 16}).max_batch_size == 16
    with pytest.raises(ConfigError, match="user_config.max_batch_sise: unknown key"):
        parse_classifier_settings({"max_batch_sise": 16})
    with pytest.raises(ConfigError, match="user_config.batch_wait_timeout_s"):
        parse_classifier_settings({"batch_wait_timeout_s": -1})
    assert parse_classifier_settings({}).torch_threads is None  # the CPU share decides
    assert parse_classifier_settings({"torch_threads": 2}).torch_threads == 2
    with pytest.raises(ConfigError, match="user_config.torch_threads: .*greater than or equal to 1"):
        parse_classifier_settings({"torch_threads": 0})


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate_with_ray_and_serve_app(path):
    data = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(data)
    apps = configfile.check(data, path.name)
    assert apps, f"{path.name} holds no serve_app application"
    for app in data["applications"]:
        for deployment in app["deployments"]:
            # Every deployment autoscales; old option names are dropped silently by Ray 2.60.
            assert "autoscaling_config" in deployment, (path.name, deployment["name"])
            assert "num_replicas" not in deployment
            for old in ("target_num_ongoing_requests_per_replica", "max_concurrent_queries"):
                assert old not in yaml.safe_dump(deployment)


def test_gpu_config_runs_the_classifier_on_fractional_gpus():
    data = configfile.load(Path(CONFIGS[0]).with_name("gpu.yaml"))
    app = data["applications"][0]
    classifier = configfile.deployment_options(app, "Classifier")
    assert 0 < classifier["ray_actor_options"]["num_gpus"] < 1
    assert "num_gpus" not in configfile.deployment_options(app, "Preprocessor").get(
        "ray_actor_options", {})
    assert app["args"]["model"]["name"] == "resnet50"


def _local_config() -> dict:
    return configfile.load(Path(CONFIGS[0]).with_name("local.yaml"))


def test_batches_that_cannot_fill_are_refused():
    data = _local_config()
    classifier = configfile.deployment_options(data["applications"][0], "Classifier")
    classifier["user_config"]["max_batch_size"] = 64
    classifier["max_ongoing_requests"] = 8
    data["applications"][0]["args"]["dispatch"] = {"max_batch_size": 8}
    configfile.check(data)  # 8 calls of 8 images can fill a batch of 64
    data["applications"][0]["args"]["dispatch"] = {"max_batch_size": 1}
    with pytest.raises(ConfigError, match=r"\(8\) times args.dispatch.max_batch_size \(1\).*"
                                          "batches could never fill"):
        configfile.check(data)


def test_threads_beyond_the_cpu_share_on_several_spinning_replicas_are_refused():
    data = _local_config()  # Classifier: num_cpus 0.8 (1 thread), 1-2 replicas
    classifier = configfile.deployment_options(data["applications"][0], "Classifier")
    classifier["user_config"]["torch_threads"] = 1
    configfile.check(data)  # what the share gives anyway
    classifier["user_config"]["torch_threads"] = 2
    with pytest.raises(ConfigError, match=r"torch_threads \(2\) is more than its CPU share "
                                          r"gives \(1\) on up to 2 replicas.*PASSIVE"):
        configfile.check(data)
    classifier["ray_actor_options"]["runtime_env"] = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}
    configfile.check(data)  # idle threads sleep: allowed
    del classifier["ray_actor_options"]["runtime_env"]
    classifier["autoscaling_config"]["max_replicas"] = 1
    configfile.check(data)  # one replica has the spare cores to itself
    classifier["ray_actor_options"]["num_cpus"] = 2
    classifier["autoscaling_config"]["max_replicas"] = 3
    configfile.check(data)  # 2 threads on a 2-CPU share


def test_unknown_deployment_and_ray_schema_errors_are_reported():
    data = _local_config()
    data["applications"][0]["deployments"].append({"name": "Clasifier", "num_replicas": 2})
    with pytest.raises(ConfigError, match="unknown deployment 'Clasifier'"):
        configfile.check(data)
    data = _local_config()
    data["applications"][0]["deployments"][0]["autoscaling_config"]["min_replicas"] = -1
    with pytest.raises(ConfigError, match="autoscaling_config.min_replicas: Input should be greater than or equal to 0"):
        configfile.check(data)


@pytest.mark.parametrize("where,key", [("deployment", "max_concurrent_queries"),
                                       ("autoscaling", "target_num_ongoing_requests_per_replica")])
def test_option_names_ray_would_drop_silently_are_refused(where, key):
    data = _local_config()
    entry = data["applications"][0]["deployments"][2]
    (entry if where == "deployment" else entry["autoscaling_config"])[key] = 4
    with pytest.raises(ConfigError, match=f"unknown keys \\['{key}'\\]"):
        configfile.check(data)


def test_check_command_exit_codes(tmp_path, capsys):
    assert cli(["check", *map(str, CONFIGS)]) == 0
    bad = _local_config()
    bad["applications"][0]["args"]["top_k_defualt"] = 3
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert cli(["check", str(path)]) == 1
    assert "args.top_k_defualt: unknown key" in capsys.readouterr().err


@pytest.mark.parametrize("policy,why", [
    ({"policy_function": "serve_app.autoscaling:NoSuchPolicy"}, "NoSuchPolicy"),
    ({"policy_function": "serve_app.autoscaling:AppPolicy",
      "policy_kwargs": {"latency_target_s": 0}}, "latency_target_s must be > 0"),
    ({"policy_function": "serve_app.autoscaling:AppPolicy",
      "policy_kwargs": {"latency_target": 1}}, "unexpected keyword argument 'latency_target'"),
])
def test_application_autoscaling_policy_is_imported_and_built(policy, why):
    data = _local_config()
    data["applications"][0]["autoscaling_policy"] = policy
    with pytest.raises(ConfigError, match=f"autoscaling_policy: .*{why}"):
        configfile.check(data)


def test_cluster_env_gives_haproxy_free_ports_unless_chosen():
    from serve_app.launch import RAY_CLUSTER_ENV, cluster_env

    env = cluster_env({**RAY_CLUSTER_ENV, "RAY_SERVE_HAPROXY_STATS_PORT": "8404"})
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"] == "8404"
    assert int(env["RAY_SERVE_HAPROXY_METRICS_PORT"]) not in (0, 9101)
    assert cluster_env({"RAY_SERVE_ENABLE_HA_PROXY": "0"}) == {"RAY_SERVE_ENABLE_HA_PROXY": "0"}


def test_free_ports_are_distinct_and_avoid_the_taken_ones():
    from serve_app.launch import cluster_env, free_ports

    taken = tuple(free_ports(3))
    ports = free_ports(20, avoid=taken)
    assert len(set(ports)) == 20 and not set(ports) & set(taken)
    env = cluster_env({"RAY_SERVE_ENABLE_HA_PROXY": "1"}, taken=taken)
    names = ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT",
             "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")
    chosen = {int(env[name]) for name in names}
    assert len(chosen) == 4 and not chosen & set(taken)


def test_listener_ports_come_from_a_block_of_this_process_outside_the_ephemeral_range():
    """A port the OS calls free is an ephemeral one any outgoing connection can take before
    the listener binds it; the allocator's are not, and a second process gets another block."""
    import subprocess
    import sys

    from serve_app.launch import free_ports

    ours = free_ports(5)
    assert all(61000 <= p < 65500 for p in ours), ours
    other = subprocess.run([sys.executable, "-c", "from serve_app.launch import free_ports; "
                            "print(*free_ports(5))"], capture_output=True, text=True, check=True)
    theirs = [int(p) for p in other.stdout.split()]
    assert len(theirs) == 5 and not set(theirs) & set(ours), (ours, theirs)
    import socket
    with socket.socket() as held:  # a port something listens on is skipped
        held.bind(("127.0.0.1", ours[-1] + 1))
        assert ours[-1] + 1 not in free_ports(3)


def test_each_cluster_gets_its_own_block_of_replica_ports():
    """Two clusters on one machine must not hand their ingress replicas the same port."""
    from serve_app.launch import PortBlock

    a, b = PortBlock(), PortBlock()
    try:
        ea, eb = a.env(), b.env()
        assert a.index != b.index
        ra = range(int(ea["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"]),
                   int(ea["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) + 1)
        rb = range(int(eb["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"]),
                   int(eb["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) + 1)
        assert not set(ra) & set(rb) and len(ra) == 100
        assert max(ra) < 32768  # below the kernel's ephemeral range
        index = a.index
    finally:
        a.release()
        b.release()
    again = PortBlock()
    try:
        assert again.index <= index  # a released block is handed out again
    finally:
        again.release()


def test_the_health_checks_forward_must_time_out_before_rays_whole_check():
    data = _local_config()  # Classifier: health_check_timeout_s 10, forward timeout 5
    classifier = configfile.deployment_options(data["applications"][0], "Classifier")
    assert classifier["health_check_timeout_s"] == 10 and classifier["health_check_period_s"] == 5
    configfile.check(data)
    classifier["user_config"]["health_check_forward_timeout_s"] = 10
    with pytest.raises(ConfigError, match=r"health_check_forward_timeout_s \(10.0\) must be "
                                          r"under the deployment's health_check_timeout_s \(10\)"):
        configfile.check(data)
    del classifier["health_check_timeout_s"]  # Ray's default, 30 s
    configfile.check(data)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_deployment_starts_its_replacement_before_stopping_a_replica(path):
    """Ray's default (max_surge_percent 0) stops a one-replica deployment's only replica
    before its replacement starts: a rollout would be an outage (tests/integration/
    test_redeploy.py)."""
    for app in configfile.load(path)["applications"]:
        for entry in app["deployments"]:
            assert entry.get("max_surge_percent", 0) >= 100, (path.name, entry["name"])


def test_a_start_whose_port_was_taken_is_retried_on_new_ports(monkeypatch):
    """The port picked free was taken before Ray bound it, or Ray's HAProxy did not come up:
    start again on other ports; any other failure is raised at once."""
    from serve_app.launch import ServeProcess

    class Flaky(ServeProcess):
        def __init__(self, errors):
            super().__init__(_local_config())
            self.errors, self.seen = list(errors), []

        def _start_once(self):
            self.seen.append((self.port, self.metrics_port,
                              self.config["http_options"]["port"], self.url))
            if self.errors:
                raise RuntimeError(self.errors.pop(0))
            return self

    svc = Flaky(["serve run exited with 1: RuntimeError: Failed to bind to address "
                 "'127.0.0.1:42077'."])
    try:
        assert svc.start() is svc and len(svc.seen) == 2
        (port1, metrics1, _, _), (port2, metrics2, cfg_port, url) = svc.seen
        assert port2 != port1 and cfg_port == port2 and url.endswith(f":{port2}")
        assert metrics2 != metrics1
    finally:
        svc.close()
    haproxy = Flaky(["serve run exited with 1:\n(HAProxyManager pid=486) ERROR -- Failed to "
                     "initialize and start HAProxy configuration: HAProxy (pid=523) did not take "
                     "over the admin socket within 30 seconds."])
    try:
        assert haproxy.start() is haproxy and len(haproxy.seen) == 2
    finally:
        haproxy.close()
    other = Flaky(["serve run exited with 1: ValueError: bad config"])
    try:
        with pytest.raises(RuntimeError, match="bad config"):
            other.start()
        assert len(other.seen) == 1
    finally:
        other.close()
