"""What the Ray cluster can run: its reachable address, its nodes' shapes, the autoscaler's maximum.

Checked by the driver before a search writes anything, so bad input fails fast and
cleanly (one line, exit code 2): an ``--address`` nobody answers on, or a trial that
asks for more CPUs or GPUs than any node has (autoscaler node types included; Ray
Tune would otherwise leave such trials pending forever).

The autoscaler's configured maximum (``max_concurrent: auto`` on an autoscaling
cluster) comes from, in order:

1. the cluster config the autoscaler reports to the GCS (Ray's own
   ``ray._private.state.state.get_cluster_config()``, the call Ray Train and Ray Data
   make for the same purpose; there is no public API for it in Ray 2.x), else
2. ``~/ray_bootstrap_config.yaml``: the cluster YAML that ``ray up`` writes on the head
   node and starts the autoscaler with (``ray start --autoscaling-config``); Ray Tune
   itself checks that file to tell an autoscaling cluster. ``ray exec`` runs the
   driver on the head, so the search reads it there.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from .errors import HaqtuneError

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
ADDRESS_TIMEOUT_S = 5.0  # a head that does not accept a TCP connection by then is not there
RESOURCE_KEYS = ("CPU", "GPU")


@dataclass(frozen=True)
class NodeShape:
    """One kind of node: its resources and how many of them the cluster may have."""

    name: str
    resources: dict = field(default_factory=dict)  # {"CPU": 8, "GPU": 1, ...}
    max_count: int = 1  # a running node: 1; an autoscaler node type: its max_workers
    is_head: bool = False  # the head node type: always there, not one of the max_workers

    def get(self, key: str) -> float:
        return float(self.resources.get(key, 0) or 0)


@dataclass(frozen=True)
class ClusterView:
    """The running nodes and, on an autoscaling cluster, the node types it may add."""

    running: tuple[NodeShape, ...]
    node_types: tuple[NodeShape, ...] = ()
    max_workers: int | None = None  # the autoscaler's cap on worker nodes of all types
    source: str | None = None  # where node_types came from (for the header line)

    def current_resources(self) -> dict[str, float]:
        return {key: sum(n.get(key) for n in self.running) for key in RESOURCE_KEYS}

    def max_resources(self) -> dict[str, float]:
        """What the cluster holds at most: its running nodes, or, when larger, every
        autoscaler node type at its ``max_workers`` (all types together at most the
        global ``max_workers`` nodes: the largest nodes first, per resource)."""
        current = self.current_resources()
        if not self.node_types:
            return current
        out = {}
        workers = [s for s in self.node_types if not s.is_head]
        for key in RESOURCE_KEYS:
            left = self.max_workers if self.max_workers is not None else math.inf
            total = sum(s.max_count * s.get(key) for s in self.node_types if s.is_head)
            for shape in sorted(workers, key=lambda s: -s.get(key)):
                count = min(shape.max_count, left)
                total += count * shape.get(key)
                left -= count
            out[key] = max(current[key], total)
        return out

    def shapes(self) -> list[NodeShape]:
        """Every node a trial could be placed on (running ones and addable types)."""
        return [*self.running, *(s for s in self.node_types if s.max_count > 0)]


def node_types_from_bootstrap(config: dict) -> tuple[tuple[NodeShape, ...], int | None]:
    """The autoscaler's node types of a cluster YAML (``available_node_types``) and its
    global ``max_workers``: the head type once (the head), every type up to its own
    ``max_workers`` workers."""
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    shapes = []
    for name, spec in types.items():
        resources = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        if name == head:
            shapes.append(NodeShape(name=f"{name} (head)", resources=resources, is_head=True))
        count = int(spec.get("max_workers", 0) or 0)
        if count > 0:
            shapes.append(NodeShape(name=name, resources=resources, max_count=count))
    max_workers = config.get("max_workers")
    return tuple(shapes), None if max_workers is None else int(max_workers)


def node_types_from_cluster_config(proto) -> tuple[NodeShape, ...]:
    """The node groups of the ``ClusterConfig`` the autoscaler reports to the GCS
    (``max_count`` -1 = unbounded)."""
    shapes = []
    for group in proto.node_group_configs:
        count = group.max_count if group.max_count >= 0 else 1 << 30
        shapes.append(NodeShape(name=group.name or "node group",
                                resources={k: float(v) for k, v in group.resources.items()},
                                max_count=int(count)))
    return tuple(shapes)


def check_trial_fits(view: ClusterView, *, cpus_per_trial: float, gpus_per_trial: float) -> None:
    """HaqtuneError when no node (running, or an autoscaler node type) can hold one trial."""
    shapes = view.shapes()
    if not shapes:
        raise HaqtuneError("the Ray cluster has no alive node: expected at least one to run trials on")
    where = "autoscaler node types included" if view.node_types else "no autoscaler configured"
    # Distinct node shapes only: a 100-node cluster still gives one short line.
    described = ", ".join(dict.fromkeys(f"{s.get('CPU'):g} CPU + {s.get('GPU'):g} GPU" for s in shapes))
    most_gpus = max(s.get("GPU") for s in shapes)
    if gpus_per_trial > most_gpus:
        raise HaqtuneError(
            f"gpus_per_trial: expected at most {most_gpus:g}, the most GPUs one node of the Ray cluster "
            f"has ({where}; node shapes: {described}), got {gpus_per_trial:g}: trials would wait forever")
    most_cpus = max(s.get("CPU") for s in shapes)
    if cpus_per_trial > most_cpus:
        raise HaqtuneError(
            f"cpus_per_trial: expected at most {most_cpus:g}, the most CPUs one node of the Ray cluster "
            f"has ({where}; node shapes: {described}), got {cpus_per_trial:g}: trials would wait forever")
    if not any(s.get("CPU") >= cpus_per_trial and s.get("GPU") >= gpus_per_trial for s in shapes):
        raise HaqtuneError(
            f"cpus_per_trial/gpus_per_trial: expected a node with {cpus_per_trial:g} CPU and "
            f"{gpus_per_trial:g} GPU together, got none in the Ray cluster ({where}; node shapes: {described})")


def _split_host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise HaqtuneError(f"--address: expected HOST:PORT (e.g. 10.0.0.1:6379), auto, or ray://HOST:PORT, "
                           f"got {address!r}")
    return host.strip("[]"), int(port)


def bootstrap_address(address: str) -> str | None:
    """``HOST:PORT`` that ``ray.init(address=...)`` connects to (None: a new local instance).

    ``auto`` is resolved the way ``ray.init`` resolves it (``RAY_ADDRESS``, else the
    cluster this machine's ``ray start`` recorded)."""
    if address == "local":
        return None
    if address.startswith("ray://"):
        return address[len("ray://"):].split("/", 1)[0]
    from ray._private.services import canonicalize_bootstrap_address

    try:
        return canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError) as exc:
        raise HaqtuneError(f"--address {address}: {' '.join(str(exc).split()) or type(exc).__name__}; "
                           "expected a running Ray cluster (`ray start --head` or `ray up`), or no "
                           "--address for a local Ray") from None


def check_address(address: str | None, *, timeout_s: float = ADDRESS_TIMEOUT_S) -> None:
    """HaqtuneError within ``timeout_s`` when nothing accepts a connection at ``address``
    (``ray.init`` would retry for minutes before failing)."""
    if address is None:
        return
    target = bootstrap_address(address)
    if target is None:
        return
    host, port = _split_host_port(target)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
        shown = address if target == address else f"{address} ({target})"
        raise HaqtuneError(
            f"--address {shown}: no Ray cluster answers there ({reason} within {timeout_s:g} s); "
            "expected the address of a running cluster's head (`ray start --head` prints it), "
            "auto on a cluster node, or no --address for a local Ray") from None


def _gcs_node_types() -> tuple[NodeShape, ...]:
    import ray

    try:
        proto = ray._private.state.state.get_cluster_config()
    except Exception:  # private API (module docstring): without it, fall back to the file
        return ()
    return node_types_from_cluster_config(proto) if proto is not None else ()


def read_cluster(*, bootstrap_config: str = BOOTSTRAP_CONFIG) -> ClusterView:
    """The connected Ray cluster's alive nodes and its autoscaler's node types, if any."""
    import ray
    import yaml

    running = tuple(NodeShape(name=f"node {n.get('NodeManagerAddress', '?')}",
                              resources={k: float(v) for k, v in (n.get("Resources") or {}).items()})
                    for n in ray.nodes() if n.get("Alive"))
    node_types = _gcs_node_types()
    if node_types:
        return ClusterView(running, node_types, None, "the autoscaler's cluster config")
    path = Path(os.path.expanduser(bootstrap_config))
    if path.is_file():
        config = yaml.safe_load(path.read_text()) or {}
        node_types, max_workers = node_types_from_bootstrap(config)
        if node_types:
            return ClusterView(running, node_types, max_workers, str(path))
    return ClusterView(running)


PROBE_QUIET_S = 10.0  # a GPU worker not ready by then is being started: say so


def probe_cuda(*, cpus_per_trial: float, gpus_per_trial: float, echo=None) -> tuple[bool, str]:
    """Whether CUDA works in a Ray worker given a trial's resources, and that worker's node IP.

    Waits for such a worker (an autoscaler may have to start one first: minutes), saying
    so once after ``PROBE_QUIET_S`` instead of waiting in silence."""
    import ray

    @ray.remote(num_cpus=cpus_per_trial, num_gpus=gpus_per_trial)
    def cuda_available() -> tuple[bool, str]:
        import torch

        return bool(torch.cuda.is_available()), ray.util.get_node_ip_address()

    ref = cuda_available.remote()
    ready, _ = ray.wait([ref], timeout=PROBE_QUIET_S)
    if not ready and echo is not None:
        echo(f"haqtune: waiting for a worker with {gpus_per_trial:g} GPU and {cpus_per_trial:g} CPU "
             "(the autoscaler may be starting one) ...")
    return ray.get(ref)


def gpu_fallback_note(config, *, echo=None) -> str | None:
    """One warning line when trials ask for GPUs that CUDA cannot use (they fall back to
    the CPU), checked once per search in a worker with a trial's resources; else None."""
    if config.gpus_per_trial <= 0:
        return None
    available, node = probe_cuda(cpus_per_trial=config.cpus_per_trial, gpus_per_trial=config.gpus_per_trial,
                                 echo=echo)
    if available:
        return None
    fp16 = [name for name in ("reference", "finetune") if getattr(config, name).amp == "fp16"]
    return (f"haqtune: warning: trials ask for {config.gpus_per_trial:g} GPU each, but CUDA is not "
            f"available in a GPU worker (node {node}): trials run on the CPU"
            + (f" ({' and '.join(fp16)} amp fp16 runs in float32 there)" if fp16 else ""))
