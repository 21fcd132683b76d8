"""Simulate serve_app's graph under a load shape, with the autoscaling policy Ray would call.

    python -m load_tests.simulate --config configs/autoscale-demo.yaml \
        --policy serve_app.autoscaling:AppPolicy --shape step --profile 50+25n \
        --duration 150 --base-users 2 --peak-users 32 --seed 0 --out runs/sim-step

No Ray cluster: Ray's own autoscaling state, policy wrappers and (with ``--policy default``)
Ray's default policy run on a simulated clock (load_tests/simulation/controller.py). Writes the
experiment's ``summary.json``, ``timeline.csv`` and ``timeline.png`` to ``--out``. Two modes:
``exact`` (every request an event; closed loop or open loop) and ``fleet`` (counts per
control-loop step, for a day of thousands of requests/s; open loop only); ``auto`` picks fleet
above ``FLEET_ABOVE`` expected requests.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from load_tests import shapes, timeline
from load_tests.simulation import arrivals, report
from load_tests.simulation.des import DiscreteEventSim, Load
from load_tests.simulation.fluid import FluidSim
from load_tests.simulation.settings import (
    CONTROL_LOOP_S,
    SimSettings,
    from_config,
    resolve_policy,
    serve_app_entry,
)
from serve_app import topology

FLEET_ABOVE = 2_000_000


@dataclass
class Outcome:
    summary: dict
    columns: list
    rows: list
    samples: list
    profile: Any
    requests: Optional[list] = None  # exact mode: timeline.Request records
    fluid: Any = None


def build_load(shape: str, duration_s: float, *, closed: bool, base: float, peak: float,
               dt: float) -> tuple[Any, Any]:
    """(profile for the summaries, rates per step or None for a closed loop)."""
    if shape not in shapes.SHAPES:
        trace = arrivals.read_trace(shape, duration_s)
        return trace, arrivals.rates_at(trace.rate, trace.duration_s, dt)
    if closed:
        return shapes.build(shape, duration_s, int(base), int(peak)), None
    profile = arrivals.rate_profile(shape, duration_s, base, peak)
    return profile, arrivals.rates_at(profile.rate, duration_s, dt)


def simulate(settings: SimSettings, shape: str, duration_s: float, *, closed: bool = True,
             base: float = 2, peak: float = 32, wait_s: float = 0.1, seed: int = 0,
             mode: str = "auto", settle_s: float = 30.0, p95_target_ms: float = 2000.0,
             meta: Optional[dict] = None) -> Outcome:
    """Run one simulation; the summary has timeline.SUMMARY_KEYS and the simulator's own."""
    started = time.perf_counter()
    dt = settings.control_period_s
    profile, rates = build_load(shape, duration_s, closed=closed, base=base, peak=peak, dt=dt)
    duration_s = profile.duration_s
    if mode == "auto":
        expected = 0 if rates is None else float(rates.sum() * dt)
        mode = "fleet" if expected > FLEET_ABOVE else "exact"
    if mode == "fleet" and rates is None:
        raise ValueError("the fleet mode runs open-loop loads only (--rate-mode or a trace)")
    mins = {name: d.autoscaling.min_replicas for name, d in settings.deployments.items()}
    end_s = duration_s + settle_s
    meta = {"config": "", "shape": profile.name, "policy": settings.policy.label,
            **(meta or {})}
    if mode == "exact":
        sim = DiscreteEventSim(settings, Load(profile, closed, wait_s, rates), duration_s,
                               seed=seed, settle_s=settle_s)
        res = sim.run()
        columns, rows = timeline.build_timeline(res.requests, res.samples, profile, end_s)
        summary = timeline.summarize(res.requests, res.samples, rows, profile, end_s, mins,
                                     p95_target_ms, meta)
        samples, requests, fluid = res.samples, res.requests, None
        extra = {"unfinished": res.unfinished, "policy_decisions": res.decisions,
                 "allocated_replica_seconds": _allocated(res.samples, end_s)}
    else:
        fluid = FluidSim(settings, rates, duration_s, seed=seed, settle_s=settle_s).run()
        samples, requests = fluid.samples, None
        columns, rows = report.fluid_rows(fluid, samples, profile, end_s)
        summary = report.fluid_summary(fluid, samples, rows, profile, end_s, mins,
                                       p95_target_ms, meta)
        extra = {"policy_decisions": fluid.decisions,
                 "allocated_replica_seconds": {**fluid.allocated,
                                               "total": round(sum(fluid.allocated.values()),
                                                              1)}}
    summary.update(extra)
    summary["mode"] = mode
    summary["gpu_fraction"] = settings.gpu_fraction
    summary["decision_period_s"] = settings.decision_period_s or settings.control_period_s
    cls_seconds = summary["replica_seconds"].get(topology.CLASSIFIER, 0.0)
    summary["gpu_hours"] = report.gpu_hours({topology.CLASSIFIER: cls_seconds},
                                            settings.gpu_fraction)[topology.CLASSIFIER]
    summary["sim_wall_s"] = round(time.perf_counter() - started, 2)
    return Outcome(summary, columns, rows, samples, profile, requests, fluid)


def _allocated(samples: list, end_s: float) -> dict[str, float]:
    """Replica-seconds held (starting + running + stopping), what a GPU bill counts."""
    totals: dict[str, float] = {}
    points = [(ts, c) for ts, c in samples if c and 0 <= ts <= end_s]
    for (ts, counts), nxt in zip(points, [p[0] for p in points[1:]] + [end_s]):
        for name, c in counts.items():
            totals[name] = totals.get(name, 0.0) + (c.running + c.starting + c.stopping) * (
                nxt - ts)
    out = {k: round(v, 1) for k, v in totals.items()}
    out["total"] = round(sum(totals.values()), 1)
    return out


def settings_from_args(args: argparse.Namespace) -> SimSettings:
    from serve_app import configfile
    from serve_app.simulated import load_profile

    config = configfile.load(args.config)
    app = serve_app_entry(config)
    policy = resolve_policy(app, args.policy, json.loads(args.policy_kwargs)
                            if args.policy_kwargs else None, args.policy_scope)
    classifier = {"min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
                  "initial_replicas": args.initial_replicas,
                  "target_ongoing_requests": args.target_ongoing_requests,
                  "upscale_delay_s": args.upscale_delay_s,
                  "downscale_delay_s": args.downscale_delay_s,
                  "metrics_interval_s": args.metrics_interval_s,
                  "look_back_period_s": args.look_back_period_s}
    ingress = {"max_replicas": args.ingress_max_replicas}
    return from_config(
        config, profile=load_profile(args.profile) if args.profile else None, policy=policy,
        start_s=args.start_s, other_start_s=args.other_start_s,
        classifier_overrides=classifier, ingress_overrides=ingress,
        max_ongoing_requests=args.max_ongoing_requests, max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_timeout_s,
        dispatch_overrides={"max_batch_size": args.dispatch_batch,
                            "max_in_flight": args.max_in_flight,
                            "max_queued": args.max_queued},
        preprocess_ms=args.preprocess_ms, gpu_fraction=args.gpu_fraction,
        control_period_s=args.control_period_s, process_start_s=args.process_start_s,
        startup_concurrency=args.startup_concurrency, decision_period_s=args.decision_period_s)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m load_tests.simulate",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="Serve config (configs/*.yaml)")
    p.add_argument("--policy", default=None,
                   help="import path of a policy, or 'default' (Ray's); default: the config's")
    p.add_argument("--policy-kwargs", default=None, help="JSON kwargs for a policy class")
    p.add_argument("--policy-scope", choices=("app", "deployment"), default=None,
                   help="an application policy (dict of contexts) or the Classifier's")
    p.add_argument("--shape", default="step",
                   help=f"{'|'.join(shapes.SHAPES)} or a t_s,rate trace.csv")
    p.add_argument("--profile", default=None,
                   help="latency profile: 'A+Bn' ms or a JSON file (default: the config's)")
    p.add_argument("--duration", type=float, default=180.0)
    p.add_argument("--base-users", type=int, default=2)
    p.add_argument("--peak-users", type=int, default=32)
    p.add_argument("--wait-s", type=float, default=0.1, help="each user's think time")
    p.add_argument("--rate-mode", action="store_true", help="open loop: Poisson arrivals")
    p.add_argument("--base-rate", type=float, default=10.0, help="requests/s (--rate-mode)")
    p.add_argument("--peak-rate", type=float, default=100.0, help="requests/s (--rate-mode)")
    p.add_argument("--mode", choices=("auto", "exact", "fleet"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settle", type=float, default=30.0, help="seconds simulated after the load")
    p.add_argument("--p95-target-ms", type=float, default=2000.0)
    p.add_argument("--out", required=True)
    p.add_argument("--no-png", action="store_true", help="skip timeline.png")
    g = p.add_argument_group("overrides of the config")
    g.add_argument("--start-s", type=float, default=None, help="classifier replica start time")
    g.add_argument("--other-start-s", type=float, default=2.0,
                   help="Ingress/Preprocessor replica start time")
    g.add_argument("--process-start-s", type=float, default=0.0,
                   help="a replica's worker process start, before --start-s")
    g.add_argument("--startup-concurrency", type=int, default=None,
                   help="worker processes the node starts at once (Ray: min(cores, num_cpus))")
    g.add_argument("--preprocess-ms", type=float, default=10.0, help="per image")
    g.add_argument("--gpu-fraction", type=float, default=1.0, help="GPU share per replica")
    g.add_argument("--control-period-s", type=float, default=CONTROL_LOOP_S)
    g.add_argument("--decision-period-s", type=float, default=None,
                   help="call the policy this often (a multiple of --control-period-s; "
                        "default: every step, as Ray does)")
    for flag, kind in (("min-replicas", int), ("max-replicas", int), ("initial-replicas", int),
                       ("target-ongoing-requests", float), ("upscale-delay-s", float),
                       ("downscale-delay-s", float), ("metrics-interval-s", float),
                       ("look-back-period-s", float), ("max-ongoing-requests", int),
                       ("max-batch-size", int), ("batch-wait-timeout-s", float),
                       ("dispatch-batch", int), ("max-in-flight", int), ("max-queued", int),
                       ("ingress-max-replicas", int)):
        g.add_argument(f"--{flag}", type=kind, default=None)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    settings = settings_from_args(args)
    closed = not args.rate_mode and args.shape in shapes.SHAPES
    base, peak = ((args.base_rate, args.peak_rate) if not closed
                  else (args.base_users, args.peak_users))
    meta = {"config": str(args.config),
            "command": " ".join(["python", "-m", "load_tests.simulate", *args.argv])}
    outcome = simulate(settings, args.shape, args.duration, closed=closed, base=base, peak=peak,
                       wait_s=args.wait_s, seed=args.seed, mode=args.mode,
                       settle_s=args.settle, p95_target_ms=args.p95_target_ms, meta=meta)
    s = outcome.summary
    prof = outcome.profile
    title = (f"{Path(args.config).name} | simulated {prof.name} {prof.base_users}->"
             f"{prof.peak_users} {'users' if closed else 'req/s'} | {s['policy']}")
    report.write(Path(args.out), outcome.columns, outcome.rows, s,
                 timeline.deployments_of(outcome.samples), prof, args.p95_target_ms, title,
                 png=not args.no_png)
    keys = ("policy", "mode", "scale_up_s", "p95_recover_s", "scale_down_s", "replica_seconds",
            "requests", "failed", "p95_hold_ms", "gpu_hours", "sim_wall_s")
    print(json.dumps({k: s[k] for k in keys if k in s}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
