"""serve_app/replica_counts.py: RUNNING by the controller, not dead by the GCS; a deployment
the controller does not list (a build under way) is left out. No Ray."""

from enum import Enum

from serve_app.replica_counts import count_running


class State(str, Enum):  # the controller's details may hold the enum or its value
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"


DEPLOYMENTS = {
    "Preprocessor": {"replicas": [{"state": "RUNNING", "actor_id": "p1"}]},
    "Classifier": {"replicas": [
        {"state": State.RUNNING, "actor_id": "killed"},
        {"state": "RUNNING", "actor_id": "alive"},
        {"state": State.STOPPING, "actor_id": "old"},
        {"state": "RUNNING", "actor_id": "unknown"},
    ]},
}
GCS = {"killed": "DEAD", "alive": "ALIVE", "old": "ALIVE", "p1": "ALIVE"}


def test_running_replicas_count_unless_the_gcs_calls_their_actor_dead():
    counts = count_running(DEPLOYMENTS, ("Preprocessor", "Classifier"), GCS.get)
    assert counts == {"Preprocessor": 1, "Classifier": 2}  # "unknown": the controller's word


def test_a_sole_killed_replica_counts_zero_before_the_controller_notices():
    one = {"Classifier": {"replicas": [{"state": "RUNNING", "actor_id": "killed"}]}}
    assert count_running(one, ("Classifier",), {"killed": "RESTARTING"}.get) == {"Classifier": 0}
    assert count_running(one, ("Classifier",), {"killed": "DEAD"}.get) == {"Classifier": 0}


def test_deployments_the_controller_does_not_list_are_left_out():
    assert count_running({}, ("Preprocessor", "Classifier"), GCS.get) == {}
    assert count_running({"Classifier": {"replicas": []}}, ("Preprocessor", "Classifier"),
                         GCS.get) == {"Classifier": 0}
