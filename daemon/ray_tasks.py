"""What runs on the Ray nodes: the job task, its progress channel, the storage probe, pack/unpack.

The task runs the pipeline exactly as the local executor does, through worker.run_job: in a child
process of its own process group, so a cancel or a timeout stops native code too, and a killed Ray
worker takes the pipeline with it (PR_SET_PDEATHSIG). Progress, the attempt and the job's pid go to
the daemon through a JobChannel actor that lives on the head node; the stop flag comes back the
same way. When the channel is gone (the daemon died), the task stops its job: no orphan work.

Ray is imported inside the functions: this module is imported only by the ray executor and by
Ray's workers, which have it.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from scandrop.daemon.ray_fanout import RayViewFanout
from scandrop.daemon.worker import kill_group, run_job, warm_up
from scandrop.models.device import resolve_device_in_child
from scandrop.pipeline.core.stage import ProgressEvent
from scandrop.pipeline.job_spec import JobSpec

STOP_POLL_SECONDS = 0.5  # how often a task asks its channel whether to stop


class JobChannel:
    """A job's mailbox between its task (any node) and the daemon (Ray actor, no CPU)."""

    def __init__(self) -> None:
        self._messages: list[tuple[str, Any]] = []
        self._stop = False
        self._attempts = 0

    def begin(self, info: dict[str, Any]) -> int:
        """A task attempt starts; returns its number (1, then 2 after a node died, ...)."""
        self._attempts += 1
        self._messages.append(("attempt", {**info, "attempt": self._attempts}))
        return self._attempts

    def put(self, kind: str, payload: Any) -> None:
        self._messages.append((kind, payload))

    def take(self) -> list[tuple[str, Any]]:
        messages, self._messages = self._messages, []
        return messages

    def request_stop(self) -> None:
        self._stop = True

    def stopped(self) -> bool:
        return self._stop


def pack(path: Path) -> bytes:
    """A drop (folder or file) or an output folder's content as one uncompressed tar."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(path, arcname=path.name)
    return buffer.getvalue()


def unpack(data: bytes, into: Path) -> list[Path]:
    """Extract a pack() into `into`; returns the top-level entries."""
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        tar.extractall(into, filter="data")  # no absolute paths, no links out of `into`
        return sorted({into / Path(m.name).parts[0] for m in tar.getmembers()})


def probe_paths(tokens: dict[str, str]) -> dict[str, Any]:
    """On one node: whether each token file (path -> content) reads back with its content."""
    import ray

    seen = {}
    for path, token in tokens.items():
        try:
            seen[path] = Path(path).read_text() == token
        except OSError:
            seen[path] = False
    return {"node_id": ray.get_runtime_context().get_node_id(), "seen": seen}


def warm_node() -> dict[str, Any]:
    """Compile the pipeline's kernels on this node (worker.warm_up, at the lowest CPU priority), so
    that its first job or depth-map task does not."""
    return {"host": socket.gethostname(), "seconds": warm_up()}


def kill_job_group(pgid: int) -> str:
    """On the job's node: what is left of its process group (after a forced cancel)."""
    kill_group(pgid)
    return socket.gethostname()


def run_on_node(
    job_id: str,
    spec_json: str,
    device_request: str,
    input_path: str,
    out_dir: str,
    input_pack: bytes | None,
    timeout: float | None,
    channel: Any,
    fanout: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The job task. Shared data: paths as given. Shipped: `input_pack` is unpacked into a node-local
    folder, the pipeline writes into another, and their contents come back as the result.
    `fanout` ({min_views, cpus}): the depth stage's views of a job this big run as Ray tasks too."""
    import ray

    context = ray.get_runtime_context()
    device = resolve_device_in_child(device_request).model_dump()
    attempt = ray.get(
        channel.begin.remote(
            {"node_id": context.get_node_id(), "node": ray.util.get_node_ip_address(), "device": device}
        )
    )
    scratch = Path(tempfile.gettempdir()) / "scandrop-ray" / f"{job_id}-{attempt}-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        if input_pack is not None:
            (source,) = unpack(input_pack, scratch / "input")
            target = scratch / "outbox"
        else:
            source, target = Path(input_path), Path(out_dir)
        last_poll, stop = 0.0, False

        def should_stop() -> bool:
            nonlocal last_poll, stop
            if not stop and time.monotonic() - last_poll >= STOP_POLL_SECONDS:
                last_poll = time.monotonic()
                try:
                    stop = bool(ray.get(channel.stopped.remote(), timeout=10))
                except Exception:  # the channel is gone with its daemon: stop, leave nothing behind
                    stop = True
            return stop

        def on_event(event: ProgressEvent) -> None:
            channel.put.remote("event", event.model_dump_json())

        report = run_job(
            source,
            target,
            JobSpec.model_validate_json(spec_json),
            scratch / "work",
            device,
            on_event=on_event,
            should_stop=should_stop,
            timeout=timeout,
            on_start=lambda pid: channel.put.remote("pid", pid),
            cpus=context.get_assigned_resources().get("CPU"),
            map_views=None
            if fanout is None
            else RayViewFanout(
                address=context.gcs_address,
                namespace=context.namespace,
                min_views=int(fanout["min_views"]),
                cpus=fanout["cpus"],
                job_node=context.get_node_id(),
            ),
        )
        outputs = None
        if input_pack is not None and target.is_dir():
            outputs = pack(target)
        return {"report": report.model_dump_json(), "outputs": outputs}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
