"""The ray executor: each job runs as a Ray task on a node with the resources its device needs.

The daemon stays the single front door (watcher, job book, status.json, API); it is a Ray driver.
It connects in the background and keeps retrying while the cluster is unreachable: jobs then wait
queued and /healthz says why. Before the first job (and whenever the set of nodes changes) a probe
decides the data mode: the daemon writes a random token next to the inputs and into the outbox, and
a task on every node reads them back; if all see them the paths are used as they are (shared),
otherwise inputs travel through Ray's object store and outputs come back to be written here
(shipped). A node that dies mid-job: Ray re-runs the task elsewhere (at most max_retries times);
each start is counted in `attempts`. Outputs are written once: by the last attempt's atomic renames
(shared) or by the daemon after the task returned (shipped).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from scandrop.daemon import ray_tasks
from scandrop.daemon.job_execution import JobHooks, JobRequest, log_warm_up
from scandrop.daemon.job_status import DataMode, ExecutionInfo
from scandrop.daemon.settings import ExecutorKind, RayData, Settings
from scandrop.daemon.worker import GRACE_SECONDS, _failed_report
from scandrop.pipeline.core.errors import ErrorCode, ErrorInfo
from scandrop.pipeline.core.stage import CANCELLED_HINT, ProgressEvent, fsync_dir, write_json_atomic
from scandrop.pipeline.report import Report

log = structlog.get_logger("scandrop.ray")

CONNECT_RETRY_SECONDS = 5.0
POLL_SECONDS = 0.2
HEAD_RESOURCE = "node:__internal_head__"  # every Ray head has one unit of it
FORCE_AFTER_SECONDS = GRACE_SECONDS + 5  # a stop the task ignored this long is forced
KILLED_TASK_ENDS_SECONDS = 15.0  # a task whose pipeline was killed returns by then (packing included)
MEMORY_BASE = 768 * 2**20  # the pipeline's own footprint
MEMORY_PER_INPUT_BYTE = 20  # decoded photos, features, depth maps: ~20x the compressed input


def memory_estimate(input_bytes: int) -> int:
    """Bytes a job reserves on its node (Ray's `memory` resource), from its input's size."""
    return MEMORY_BASE + MEMORY_PER_INPUT_BYTE * input_bytes


class RayExecutor:
    kind = ExecutorKind.ray

    def __init__(self, settings: Settings) -> None:
        import ray  # only here: the local executor never loads Ray

        self._ray = ray
        self.settings = settings
        self._lock = threading.Lock()
        self._problem: str | None = f"connecting to the Ray cluster at {settings.ray_address}"
        self._connected = False
        self._closed = threading.Event()
        self._probed_nodes: frozenset[str] | None = None
        self._mode = DataMode.shipped
        self._remote: dict[str, Any] = {}
        self._warming: dict[str, Any] = {}  # node id -> its warm-up task, None once it answered
        self._thread = threading.Thread(target=self._connect_loop, name="ray-connect", daemon=True)
        self._thread.start()

    # -- connection ---------------------------------------------------------------------------
    def problem(self) -> str | None:
        return self._problem

    def _connect_loop(self) -> None:
        """Connect, then keep watching: while the head does not answer, no job starts."""
        ray = self._ray
        while not self._closed.is_set():
            try:
                _check_reachable(self.settings.ray_address)  # ray.init would hang for minutes instead
                if not self._connected:
                    ray.init(
                        address=self.settings.ray_address,
                        namespace="scandrop",
                        log_to_driver=False,
                        logging_level="WARNING",
                        configure_logging=False,
                    )
                    self._remote = {
                        "channel": ray.remote(ray_tasks.JobChannel),
                        "run": ray.remote(ray_tasks.run_on_node),
                        "probe": ray.remote(ray_tasks.probe_paths),
                        "kill": ray.remote(ray_tasks.kill_job_group),
                        "warm": ray.remote(ray_tasks.warm_node),
                    }
                    self._connected = True
                    log.info(
                        "ray_connected", address=self.settings.ray_address, nodes=len(self._alive_nodes())
                    )
                if not self._worker_nodes():
                    raise ConnectionError("no node with CPUs or GPUs has joined")
                if self._problem is not None:
                    log.info("ray_ready", address=self.settings.ray_address, nodes=len(self._worker_nodes()))
                self._problem = None
                self._warm_nodes()
            except Exception as exc:  # refused, timed out, no cluster, no worker node, auth: not (yet)
                if self._problem is None or self._problem.startswith("connecting"):
                    log.warning("ray_unreachable", address=self.settings.ray_address, error=str(exc))
                self._problem = (
                    f"the Ray cluster at {self.settings.ray_address} is not ready ({exc}); "
                    "queued jobs wait and start when it is"
                )
                if not self._connected:
                    with contextlib.suppress(Exception):
                        ray.shutdown()
            self._closed.wait(CONNECT_RETRY_SECONDS)

    def _warm_nodes(self) -> None:
        """Each node that joins compiles the pipeline's kernels once (no CPU reserved: it runs at the
        lowest priority), so that its first job or depth-map task does not; the log says when."""
        if not self.settings.warm_up:
            return
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        for node in self._worker_nodes() - self._warming.keys():
            self._warming[node] = (
                self._remote["warm"]
                .options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                .remote()
            )
        for node, ref in self._warming.items():
            if ref is None or not self._ray.wait([ref], timeout=0)[0]:
                continue
            self._warming[node] = None
            try:
                answer = self._ray.get(ref)
            except Exception as exc:  # the node left, or the task failed
                answer = {"error": str(exc)}
            log_warm_up(answer.pop("seconds", None), node=node, **answer)

    def close(self) -> None:
        self._closed.set()
        if self._connected:
            with contextlib.suppress(Exception):
                self._ray.shutdown()

    def _alive_nodes(self) -> list[dict[str, Any]]:
        return [n for n in self._ray.nodes() if n.get("Alive")]

    def _worker_nodes(self) -> frozenset[str]:
        """The nodes that can run a job (a head started with --num-cpus=0 cannot)."""
        return frozenset(
            n["NodeID"]
            for n in self._alive_nodes()
            if n.get("Resources", {}).get("CPU", 0) or n.get("Resources", {}).get("GPU", 0)
        )

    # -- data mode ----------------------------------------------------------------------------
    def data_mode(self, request: JobRequest) -> DataMode:
        """shared or shipped: said by the settings, else probed once per set of nodes."""
        if self.settings.ray_data != RayData.auto:
            return DataMode(self.settings.ray_data.value)
        with self._lock:
            workers = self._worker_nodes()
            if workers != self._probed_nodes:
                self._mode = self._probe(workers, [request.input_path.parent, request.out_dir.parent])
                self._probed_nodes = workers
                log.info("ray_data_mode", mode=self._mode.value, nodes=len(workers))
            return self._mode

    def _probe(self, nodes: frozenset[str], folders: list[Path]) -> DataMode:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        tokens: dict[str, str] = {}
        try:
            for folder in folders:
                path = folder / f".scandrop-probe-{secrets.token_hex(8)}"
                path.write_text(token := secrets.token_hex(16))
                tokens[str(path)] = token
            refs = [
                self._remote["probe"]
                .options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                .remote(tokens)
                for node in nodes
            ]
            answers = self._ray.get(refs, timeout=60)
            shared = bool(answers) and all(all(a["seen"].values()) for a in answers)
        except Exception as exc:  # a node that cannot answer cannot be trusted with paths
            log.warning("ray_probe_failed", error=str(exc))
            shared = False
        finally:
            for path in tokens:
                Path(path).unlink(missing_ok=True)
        return DataMode.shared if shared else DataMode.shipped

    # -- a job --------------------------------------------------------------------------------
    def run(self, request: JobRequest, hooks: JobHooks) -> Report:
        ray = self._ray
        started = datetime.now(UTC)
        try:
            mode, channel, ref = self._submit(request)
        except Exception as exc:  # the cluster went away between the check and the submission
            self._problem = f"the Ray cluster at {self.settings.ray_address} did not take a job ({exc})"
            log.warning("ray_submit_failed", job_id=request.job_id, error=str(exc)[:500])
            return _failed_report(
                request.input_path,
                request.out_dir,
                request.spec,
                request.device,
                started,
                ErrorInfo(
                    code=ErrorCode.worker_crashed,
                    message=f"The job could not be submitted to the Ray cluster ({type(exc).__name__}).",
                    hint="It waits queued until the cluster answers again (see /healthz).",
                ),
            )
        where: dict[str, Any] = {}
        t0 = time.monotonic()
        deadline = None if request.timeout is None else request.timeout + 2 * FORCE_AFTER_SECONDS
        stopping_since: float | None = None
        reason: ErrorInfo | None = None
        try:
            while True:
                done, _ = ray.wait([ref], timeout=POLL_SECONDS)
                self._drain(channel, hooks, mode, where, request.job_id)
                if done:
                    break
                overdue = deadline is not None and time.monotonic() - t0 > deadline
                if stopping_since is None and (hooks.should_stop() or overdue):
                    channel.request_stop.remote()
                    stopping_since = time.monotonic()
                    if overdue:
                        reason = _timeout(request.timeout)
                if stopping_since is not None and time.monotonic() - stopping_since > FORCE_AFTER_SECONDS:
                    self._force_cancel(ref, where)
                    stopping_since = float("inf")  # once
            result: dict[str, Any] | None = None
            lost: ErrorInfo | None = None
            try:
                result = ray.get(ref)
            except ray.exceptions.TaskCancelledError:
                pass
            except (ray.exceptions.RayError, ConnectionError) as exc:
                if stopping_since is None:  # not our own forced cancel: the task was lost
                    log.warning("ray_task_failed", job_id=request.job_id, error=str(exc)[:500])
                    lost = ErrorInfo(
                        code=ErrorCode.worker_crashed,
                        message="The Ray task of this job was lost"
                        f" ({type(exc).__name__}, after {where.get('attempt', 0)} attempt(s)).",
                        hint="A node died or ran out of memory: check the cluster (ray status); "
                        "the job is retried up to max_retries.",
                    )
            self._drain(channel, hooks, mode, where, request.job_id)
        finally:
            with contextlib.suppress(Exception):
                if stopping_since is None and not ray.wait([ref], timeout=0)[0]:
                    self._force_cancel(ref, where)  # we are leaving: the task must not run on alone
            with contextlib.suppress(Exception):
                ray.kill(channel)
        report = None if result is None else Report.model_validate_json(result["report"])
        # A forced stop kills the pipeline first: its task then reports a crash that was our doing.
        killed = stopping_since is not None and report is not None and _crashed(report)
        if report is None or killed:
            error = (
                lost
                or reason
                or ErrorInfo(code=ErrorCode.cancelled, message="The job was cancelled.", hint=CANCELLED_HINT)
            )
            return _failed_report(
                request.input_path, request.out_dir, request.spec, request.device, started, error
            )
        if result["outputs"] is not None:
            report.input, report.output = str(request.input_path), str(request.out_dir)
            _write_outputs(result["outputs"], request.out_dir, request, report)
        return report

    def _submit(self, request: JobRequest) -> tuple[DataMode, Any, Any]:
        """The data mode, the job's channel on the head node, and the task.

        The channel lives on the head, which only dies with the cluster: on the driver's own node
        it could share the fate of the node that runs the job (a driver may attach to any raylet
        of its machine), and the retried task would find it gone."""
        ray = self._ray
        mode = self.data_mode(request)
        channel = self._remote["channel"].options(num_cpus=0, resources={HEAD_RESOURCE: 0.001}).remote()
        input_pack = ray.put(ray_tasks.pack(request.input_path)) if mode == DataMode.shipped else None
        ref = (
            self._remote["run"]
            .options(
                num_cpus=self.settings.ray_job_cpus,
                num_gpus=1 if request.device_request == "cuda" else 0,
                memory=self._memory(request.input_bytes),
                max_retries=self.settings.max_retries,
                retry_exceptions=False,
                name=f"scandrop-job-{request.job_id}",
            )
            .remote(
                request.job_id,
                request.spec.model_dump_json(),
                request.device_request,
                str(request.input_path),
                str(request.out_dir),
                input_pack,
                request.timeout,
                channel,
                self._fanout(),
            )
        )
        return mode, channel, ref

    def _fanout(self) -> dict[str, float] | None:
        """Whether (and from how many views on) a job's depth maps fan out over the cluster."""
        if not self.settings.ray_fanout_min_views:
            return None
        return {"min_views": self.settings.ray_fanout_min_views, "cpus": self.settings.ray_fanout_cpus}

    def _memory(self, input_bytes: int) -> int:
        """The estimate, capped at the largest node's memory so that a big job still finds a node."""
        largest = max((n.get("Resources", {}).get("memory", 0) for n in self._alive_nodes()), default=0)
        wanted = memory_estimate(input_bytes)
        return int(min(wanted, largest)) if largest else wanted

    def _drain(
        self, channel: Any, hooks: JobHooks, mode: DataMode, where: dict[str, Any], job_id: str
    ) -> None:
        with contextlib.suppress(Exception):  # the channel answers again at the next poll, or is gone
            for kind, payload in self._ray.get(channel.take.remote(), timeout=10):
                if kind == "event" and hooks.on_event is not None:
                    hooks.on_event(ProgressEvent.model_validate_json(payload))
                elif kind == "pid":
                    where["pid"] = payload
                elif kind == "attempt":
                    where.update(payload)
                    where.pop("pid", None)
                    info = ExecutionInfo(
                        executor=self.kind, data=mode, node=payload["node"], node_id=payload["node_id"]
                    )
                    log.info("ray_attempt", job_id=job_id, attempt=payload["attempt"], node=payload["node"])
                    if hooks.on_attempt is not None:
                        hooks.on_attempt(payload["attempt"], info, payload["device"])

    def _force_cancel(self, ref: Any, where: dict[str, Any]) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        kill_group = None
        if "pid" in where and "node_id" in where:
            kill = self._remote["kill"].options(
                num_cpus=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(where["node_id"], soft=False),
            )

            def kill_group() -> None:
                self._ray.get(kill.remote(where["pid"]), timeout=30)

        force_end(self._ray, ref, kill_group)


def force_end(ray: Any, ref: Any, kill_group: Callable[[], None] | None) -> None:
    """End a job task that ignored its stop. The job's process group on its node is killed first:
    the task then sees its pipeline gone and returns by itself. ray.cancel(force) is the last resort,
    for a task still running after that (wedged outside its pipeline): in Ray 2.60 a forced cancel
    of a task whose result is already on its way aborts the driver (see ray_fanout), so it is never
    sent to a task that has ended or is ending."""
    if kill_group is not None:
        with contextlib.suppress(Exception):
            kill_group()
        with contextlib.suppress(Exception):
            if ray.wait([ref], timeout=KILLED_TASK_ENDS_SECONDS)[0]:
                return
    with contextlib.suppress(Exception):
        if ray.wait([ref], timeout=0)[0]:
            return
        ray.cancel(ref, force=True, recursive=True)


def _crashed(report: Report) -> bool:
    return report.error is not None and report.error.code == ErrorCode.worker_crashed


def _check_reachable(address: str) -> None:
    """A TCP connect to the cluster's front port (GCS, or the Ray Client server); raises if none."""
    if address.startswith("ray://"):
        host, _, port = address.removeprefix("ray://").partition(":")
        endpoint = (host, int(port or 10001))
    else:
        # Ray's own resolution of "auto" / HOST:PORT (a private helper; it raises when none is found).
        from ray._private.services import canonicalize_bootstrap_address_or_die

        host, _, port = canonicalize_bootstrap_address_or_die(address).rpartition(":")
        endpoint = (host.strip("[]"), int(port))
    with socket.create_connection(endpoint, timeout=3):
        pass


def _timeout(timeout: float | None) -> ErrorInfo:
    return ErrorInfo(
        code=ErrorCode.timeout,
        message=f"The job ran past its time limit of {timeout or 0:.0f} s.",
        hint="Raise job_timeout, use --preset fast, or drop fewer/smaller photos.",
    )


def _write_outputs(data: bytes, out_dir: Path, request: JobRequest, report: Report) -> None:
    """Shipped outputs into the outbox: unpacked beside it, then each file renamed into place;
    report.json says the daemon's paths, not the node's scratch folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    incoming = Path(tempfile.mkdtemp(prefix=".incoming-", dir=out_dir))
    try:
        (root,) = ray_tasks.unpack(data, incoming)
        write_json_atomic(root / "report.json", report.model_dump(mode="json"))
        for path in sorted(root.rglob("*")):
            if path.is_file():
                target = out_dir / path.relative_to(root)
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(path, target)
                fsync_dir(target.parent)
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
    log.info("ray_outputs_written", job_id=request.job_id, folder=str(out_dir))
