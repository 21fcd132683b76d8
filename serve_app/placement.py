"""Where replicas may run: Ray's label selectors, evaluated here so configs can be checked.

A deployment's ``ray_actor_options.label_selector`` is a hard constraint in Ray 2.60: a
replica runs only on a node whose labels match every key. serve_app keeps its node pools
apart with one label, :data:`POOL_LABEL` (``cpu`` or ``gpu``, set on each KubeRay worker
group): CPU-only deployments select ``!gpu`` so spread placement cannot put them on a GPU
pod's spare CPUs and leave a classifier pending (docs/kubernetes.md), the Classifier selects
``!cpu`` and needs its fractional GPU. Negations match a node without the label, so
``serve run configs/gpu.yaml`` still works on one unlabelled GPU machine.

The matching rules are Ray's (``ray/_private/label_utils.py`` for the syntax; checked against
a live 2.60 raylet: a missing key fails ``value`` and passes ``!value``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

#: The node label that names a node's pool ("cpu", "gpu"; the head is "head").
POOL_LABEL = "serve-app/pool"

_IN = re.compile(r"^(!?)in\((.*)\)$")


def value_matches(selector: str, value: str | None) -> bool:
    """One selector value (``a``, ``!a``, ``in(a, b)``, ``!in(a, b)``) against a node's value
    of that key (``None``: the node lacks the key)."""
    m = _IN.match(selector)
    if m:
        negate, options = m.group(1) == "!", {o.strip() for o in m.group(2).split(",")}
    else:
        negate, options = selector.startswith("!"), {selector.lstrip("!")}
    hit = value is not None and value in options
    return not hit if negate else hit


def selector_matches(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    """Every key of ``selector`` matches the node's ``labels``."""
    return all(value_matches(v, labels.get(k)) for k, v in (selector or {}).items())


@dataclass(frozen=True)
class NodeType:
    """A kind of node a cluster can have (a KubeRay group): its labels and logical resources."""

    name: str
    labels: Mapping[str, str]
    cpus: float
    gpus: float


@dataclass(frozen=True)
class Placement:
    """What one deployment's replica asks of a node."""

    deployment: str
    selector: Mapping[str, str]
    cpus: float
    gpus: float

    def fits(self, node: NodeType) -> bool:
        return (selector_matches(self.selector, node.labels)
                and self.cpus <= node.cpus + 1e-9 and self.gpus <= node.gpus + 1e-9)


def placements(config: Mapping[str, Any]) -> list[Placement]:
    """Each deployment of each application in a Serve config, as a :class:`Placement`."""
    out = []
    for app in config.get("applications") or []:
        for d in app.get("deployments") or []:
            opts = d.get("ray_actor_options") or {}
            out.append(Placement(d["name"], dict(opts.get("label_selector") or {}),
                                 float(opts.get("num_cpus", 1)), float(opts.get("num_gpus", 0))))
    return out


def placement_errors(config: Mapping[str, Any], nodes: Iterable[NodeType]) -> list[str]:
    """A line per deployment that no node type can hold (labels and resources both)."""
    nodes = list(nodes)
    return [f"deployment {p.deployment}: no node group can hold a replica "
            f"(label_selector {dict(p.selector)}, {p.cpus:g} CPU, {p.gpus:g} GPU; groups: "
            + ", ".join(f"{n.name} {dict(n.labels)} {n.cpus:g} CPU/{n.gpus:g} GPU" for n in nodes)
            + ")"
            for p in placements(config) if not any(p.fits(n) for n in nodes)]
