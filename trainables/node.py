"""Where a process runs, and node-local data: every node prepares its own data root.

Kept free of torch so that locking and node naming stay cheap to import.

Data root (``data_root`` in a search config)
--------------------------------------------
The default, ``DEFAULT_DATA_ROOT`` = ``~/.cache/haqtune/data``, is expanded on the
node that loads the data (not on the driver), so every node of a cluster downloads
or reads its own copy under its own user's home. ``HAQTUNE_DATA_ROOT`` set on a
node replaces the default there (e.g. a big local disk on GPU workers). An explicit
``data_root`` in the config is used as given on every node: point it at a shared
file system (NFS, a FUSE-mounted bucket) mounted at the same path on every node.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable
from pathlib import Path

DEFAULT_DATA_ROOT = "~/.cache/haqtune/data"
DATA_ROOT_ENV = "HAQTUNE_DATA_ROOT"
READY_SUFFIX = ".ready"  # marker of a prepared dataset: "<root>/.<name>.ready"
LOCK_TIMEOUT_S = 3600.0  # an ImageNet-size download may take long; a dead holder's lock is freed by the OS


def node_info() -> dict[str, str | None]:
    """This process's node: Ray node id (None outside Ray), IP address and host name.

    On a real cluster the IP tells nodes apart; on a fake one (``ray.cluster_utils.Cluster``,
    every node on 127.0.0.1) only the node id does, so both are recorded.
    """
    node_id = ip = None
    with contextlib.suppress(ImportError):
        import ray

        if ray.is_initialized():
            node_id = ray.get_runtime_context().get_node_id()
            ip = ray.util.get_node_ip_address()
    hostname = socket.gethostname()
    return {"node_id": node_id, "ip": ip or _local_ip(hostname), "hostname": hostname}


def _local_ip(hostname: str) -> str:
    try:
        return socket.gethostbyname(hostname)
    except OSError:
        return "127.0.0.1"


def node_label(info: dict | None = None) -> str:
    """``hostname (ip)``: how errors name a node."""
    info = info or node_info()
    return f"{info['hostname']} ({info['ip']})"


def node_data_root(root: str | None) -> str:
    """The absolute data root on this node (see the module docstring)."""
    if root is None or root == DEFAULT_DATA_ROOT:
        root = os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT
    return os.path.abspath(os.path.expanduser(root))


def prepare_once(root: str, name: str, prepare: Callable[[bool], object], *,
                 timeout_s: float = LOCK_TIMEOUT_S) -> tuple[object, bool]:
    """Prepare dataset ``name`` under ``root`` once per node; returns ``(result, prepared_here)``.

    ``prepare(download)`` builds the dataset, downloading and unpacking it when
    ``download`` is true. The first caller on a node downloads under a file lock
    (``<root>/.<name>.lock``) and then writes a marker (``<root>/.<name>.ready``);
    callers that find the marker build the dataset from the files without
    downloading or re-checking them; callers that arrive while the first one is
    downloading wait for its lock, so concurrent trials of one node never race
    on half-written files. A failed preparation writes no marker (the next caller
    tries again), and a crashed holder's lock is released by the OS.
    """
    from filelock import FileLock

    marker = Path(root) / f".{name}{READY_SUFFIX}"
    if marker.exists():
        return prepare(False), False
    Path(root).mkdir(parents=True, exist_ok=True)
    with FileLock(str(Path(root) / f".{name}.lock"), timeout=timeout_s):
        if marker.exists():  # prepared by another process while this one waited
            return prepare(False), False
        result = prepare(True)
        marker.touch()
    return result, True
