"""How many replicas of a deployment can answer now, by the controller and the GCS together.

The ingress asks this before it refuses a model's requests (serve_app/availability.py). The
controller alone lags both ways: it counts a SIGKILLed replica RUNNING until its next health
check (5 s for the classifier as shipped), and while a new config's build task runs (changed
``args`` or code) it lists none of the application's deployments, the old replicas serving
on. The GCS marks a killed replica's actor DEAD within about a second, so a RUNNING replica
counts only while its actor is not dead there; a deployment the controller does not list is
left out (no count is no outage).
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

#: GCS actor states of an actor that cannot take a call now.
_GONE = frozenset({"DEAD", "RESTARTING"})


def count_running(deployments: dict, names: Iterable[str],
                  actor_state: Callable[[str], Optional[str]]) -> dict[str, int]:
    """Per listed deployment name: replicas the controller counts RUNNING whose actor
    ``actor_state(actor_id)`` does not call dead (None: unknown, counted). ``deployments``
    is one application's ``deployments`` from the controller's serve details."""
    counts = {}
    for name in names:
        if name not in deployments:
            continue
        counts[name] = sum(
            1 for r in deployments[name].get("replicas", [])
            if str(getattr(r.get("state"), "value", r.get("state"))) == "RUNNING"
            and not (r.get("actor_id") and actor_state(r["actor_id"]) in _GONE))
    return counts


def _actor_state(actor_id: str) -> Optional[str]:
    from ray._private import state

    try:
        return state.actors(actor_id=actor_id).get("State")
    except Exception:  # the GCS cannot tell: the controller's word stands
        return None


def running_replicas(names: tuple[str, ...]) -> dict[str, int]:
    """:func:`count_running` for this replica's application (blocking controller and GCS
    calls: run it in a thread)."""
    from ray import serve
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    app = details["applications"][serve.get_replica_context().app_name]
    return count_running(app.get("deployments", {}), names, _actor_state)
