"""load_tests.replica_starts on a Serve log as `serve run` prints it (no Ray)."""

from datetime import datetime

from load_tests import replica_starts

ESC = "\x1b[36m"


def stamp(epoch: float) -> str:
    return datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]


def controller(epoch: float, text: str) -> str:
    return f"{ESC}(ServeController pid=10)\x1b[0m INFO {stamp(epoch)} controller 10 -- {text}"


def first_batch(epoch: float, pid: int, cpu: float, mode: str = "compiled") -> str:
    return (f"{ESC}(ServeReplica:serve_app:Classifier pid={pid})\x1b[0m INFO {stamp(epoch)} "
            f"serve_app_Classifier abc -- Classifier first batch: at {epoch:.3f} (epoch), "
            f"{cpu:.2f} CPU-s spent before it, init 1.40s, {mode}, process started at "
            f"{epoch - 5:.3f}")


ORIGIN = 1_800_000_000.0
LOG = [
    controller(ORIGIN - 30, "Adding 1 replica to Deployment(name='Classifier', app='serve_app')."),
    first_batch(ORIGIN - 10, 100, 8.8),  # the replica of the deploy, before the load
    controller(ORIGIN + 20, "Adding 1 replica to Deployment(name='Preprocessor', app='serve_app')."),
    controller(ORIGIN + 21, "Adding 2 replicas to Deployment(name='Classifier', app='serve_app')."),
    first_batch(ORIGIN + 27.5, 200, 6.1),
    first_batch(ORIGIN + 33, 201, 7.0, "eager"),
    controller(ORIGIN + 80, "Removing 1 replica from Deployment(name='Classifier', app='serve_app')."),
]


def test_each_scale_up_is_paired_with_the_first_batch_after_it():
    started = replica_starts.starts(replica_starts.parse(LOG), ORIGIN)
    assert [(s["decided_s"], s["to_serving_s"], s["cpu_s_before_serving"], s["mode"])
            for s in started] == [(21.0, 6.5, 6.1, "compiled"), (21.0, 12.0, 7.0, "eager")]
    assert [s["to_process_s"] for s in started] == [1.5, 7.0]


def test_a_replica_that_never_served_has_no_serving_time():
    started = replica_starts.starts(replica_starts.parse(LOG[:4]), ORIGIN)
    assert started == [{"decided_s": 21.0}, {"decided_s": 21.0}]


def test_removal_is_timed_from_the_newest_replica_serving():
    parsed = replica_starts.parse(LOG)
    started = replica_starts.starts(parsed, ORIGIN)
    assert replica_starts.removals_after_serving(parsed, started, ORIGIN) == [47.0]


def test_served_windows_start_with_the_window_before_the_decision():
    rows = [{"t_s": t, "rps": 10 if t < 23 else 4} for t in range(40)]
    assert replica_starts.served_windows(rows, 18.0, 33.0) == [50, 44, 20, 20]
