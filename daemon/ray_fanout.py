"""One big job across machines: the depth stage's per-view tasks as Ray tasks over the cluster.

`RayViewFanout` is the pipeline's `ViewMapper` for jobs of the ray executor. The job task
(ray_tasks.run_on_node) hands it to its pipeline process, which connects to the cluster as a Ray
driver of its own for the depth stage only. Each view becomes a task reserving `cpus` CPUs; the
photos a view reads go into the object store once and its depth file comes back as bytes, written
into the job's workspace atomically, where fusion reads it. Both data modes work this way: the
workspace is the job node's scratch folder, which other nodes do not see even when the inbox and
outbox are shared. The job's own node computes views too, one at a time, in the CPUs the job task
already holds, so that a cluster whose other CPUs are busy still makes progress; it does so in a
thread of its own, so that handing out and gathering views never waits for a local view. Each free
CPU of the cluster gets two views (PREFETCH), so that the next one waits on its node, not on a
round trip to this process. A node's worker keeps the job's photos it was sent from view to view,
so each is undistorted once per worker, as on the job's node. The free CPUs are re-read between
views: a cluster busy with other jobs when the stage starts joins in as they finish.

The geometric-consistency pass is a second round of view tasks, which also ship the first round's
depth files of a view and its sources (PRIOR_KEY), each put once.

Stop: the stage disconnects its driver (ray.shutdown) before it raises, and Ray kills the
outstanding view tasks of the finished driver on every node; a pipeline process that is killed
outright takes its driver with it, with the same effect. No task is cancelled one by one: in Ray
2.60, ray.cancel(force=True) of a task whose result is already on its way aborts the driver ("Tried
to complete task that was not pending"); a failed view ending the stage while others finished did.
A view task that failed is the job's error (its own ScandropError when it raised one), never a hang:
Ray retries a view whose node died (max_retries) and then reports it lost.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import queue
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import structlog

from scandrop.pipeline.core.cpu_budget import limit_threads
from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.core.stage import Progress, StopCheck, atomic_path, check_stop
from scandrop.pipeline.dense.view_map import ViewDone, ViewWork, view_done

log = structlog.get_logger("scandrop.ray")

POLL_SECONDS = 0.2
SCRATCH_PREFIX = "scandrop-view-"  # + the task's pid: a dead one's folder is swept by the next
PREFETCH = 2  # view tasks in flight per free CPU: the next one waits on its node, not on a round trip
VIEW_RETRIES = 2  # a view whose node died runs again elsewhere, at most this often
MASK_KEY = "\0mask"  # the view's mask among its shipped files (no photo is named so)
PRIOR_KEY = "\0prior/"  # + a depth file's name: the earlier pass's maps a view task reads


def run_view(
    work: ViewWork, task: Any, names: list[str], *blobs: bytes
) -> tuple[str, float, str, bytes | None]:
    """On any node: one view's depth in a scratch folder, from its shipped photos (and mask).
    Returns (name, valid share, node id, the depth file's bytes or None when none was written)."""
    import ray

    limit_threads(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))
    _sweep_scratch()
    shipped = dict(zip(names, blobs, strict=True))
    mask = shipped.pop(MASK_KEY, None)
    priors = {key.removeprefix(PRIOR_KEY): shipped.pop(key) for key in names if key.startswith(PRIOR_KEY)}
    with tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-") as scratch:
        root = Path(scratch)
        mask_path = root / "mask.png" if mask is not None else None
        if mask_path is not None:
            mask_path.write_bytes(mask)
        local = dataclasses.replace(
            task,
            image_dir=_photo_copies(task.image_dir, shipped),
            mask_path=mask_path,
            out_path=root / "depth.npz",
            **({"prior_dir": _photo_copies(task.prior_dir, priors)} if task.prior_names else {}),
        )
        view, fraction = work(local)
        out = local.out_path.read_bytes() if local.out_path.exists() else None
    return view, fraction, ray.get_runtime_context().get_node_id(), out


def _photo_copies(job_images: Path, photos: dict[str, bytes]) -> Path:
    """This process's copies of a job's photos, kept from view to view (a Ray worker serves one
    job's driver and ends with it): each photo is written once, so its path and time stay the same
    and the depth code's per-process cache of undistorted grey photos serves the next views."""
    key = hashlib.sha1(str(job_images).encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"{SCRATCH_PREFIX}{os.getpid()}-photos" / key
    for name, data in photos.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != len(data):
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
    return folder


def _sweep_scratch() -> None:
    """Remove the scratch folders of view tasks whose process is gone (a forced cancel kills it)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*"):
        pid = folder.name.removeprefix(SCRATCH_PREFIX).split("-")[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class RayViewFanout:
    """The ViewMapper of a ray job; plain data, so it crosses into the job's pipeline process."""

    address: str  # the cluster's GCS address, as the job task sees it
    namespace: str
    min_views: int
    cpus: float  # CPUs each view task reserves
    job_node: str  # the node id of the job task (where views computed locally run)

    def map(
        self, work: ViewWork, tasks: list[Any], progress: Progress, should_stop: StopCheck
    ) -> list[ViewDone]:
        import cv2
        import ray

        check_stop(should_stop)
        threads = cv2.getNumThreads()  # a view computed here may narrow them (pair stereo does)
        gather = _Gather(ray, self, work, tasks, progress, should_stop)
        try:
            try:
                ray.init(
                    address=self.address,
                    namespace=self.namespace,
                    log_to_driver=False,
                    logging_level="WARNING",
                    configure_logging=False,
                )
            except Exception as exc:  # the cluster does not answer this process: the job's node does all
                log.warning("ray_fanout_unavailable", error=str(exc)[:300])
                return gather.run(connected=False)
            try:
                return gather.run(connected=True)
            finally:
                ray.shutdown()  # a stop or a failure leaves views running: Ray kills them now
        finally:
            gather.close()
            cv2.setNumThreads(threads)


class _Gather:
    """One fan-out: keeps the free view slots of the cluster busy, computes views here in between."""

    def __init__(
        self,
        ray: Any,
        fanout: RayViewFanout,
        work: ViewWork,
        tasks: list[Any],
        progress: Progress,
        should_stop: StopCheck,
    ) -> None:
        self.ray, self.fanout, self.work = ray, fanout, work
        self.queue, self.total = list(tasks), len(tasks)
        self.progress, self.should_stop = progress, should_stop
        self.remote = ray.remote(run_view).options(
            num_cpus=fanout.cpus, max_retries=VIEW_RETRIES, retry_exceptions=False, name="scandrop-view"
        )
        self.photos: dict[str, Any] = {}  # photo (or PRIOR_KEY + depth file) -> object ref, put once
        self.pending: dict[Any, Any] = {}  # object ref -> its task
        self.done: list[ViewDone] = []
        self.lock = threading.Lock()  # guards the queue, which the local thread takes from too
        self.closing = threading.Event()
        self.local_done: queue.SimpleQueue[ViewDone | BaseException] = queue.SimpleQueue()
        self.local = threading.Thread(target=self._local_views, name="scandrop-local-views", daemon=True)

    def run(self, connected: bool) -> list[ViewDone]:
        slots = 0  # view tasks the cluster can run at once besides this job
        try:
            while len(self.done) < self.total:
                check_stop(self.should_stop)
                self._take_local()
                slots = self._slots(slots) if connected else 0
                while len(self.pending) < slots * PREFETCH and (task := self._next(front=True)) is not None:
                    self.pending[self._submit(task)] = task
                if self.local.ident is None:  # not started yet: after the cluster's first share
                    self.local.start()
                if self.pending:
                    for ref in self._ready():
                        self._gather(ref, self.pending.pop(ref))
                else:
                    self._take_local(wait=POLL_SECONDS)
        finally:
            self.closing.set()  # the local thread takes no more views
        return self.done

    def close(self) -> None:
        """Wait for the view the local thread is computing (after the driver let go of the cluster's;
        `run` has already told it to take no more)."""
        if self.local.is_alive():
            self.local.join()

    def _next(self, front: bool) -> Any | None:
        """The next view to compute: the cluster's from the front of the queue, ours from the end."""
        with self.lock:
            if self.closing.is_set() or not self.queue:
                return None
            return self.queue.pop(0 if front else -1)

    def _local_views(self) -> None:
        """The job's own CPUs, in a thread of their own: views one at a time until none is left.
        Only computation runs here; Ray calls and progress stay in the stage's thread."""
        try:
            while (task := self._next(front=False)) is not None:
                name, fraction = self.work(task)
                self.local_done.put(ViewDone(name=name, valid_fraction=fraction, node=self.fanout.job_node))
        except BaseException as exc:  # handed to the stage's thread, which raises it
            self.local_done.put(exc)

    def _take_local(self, wait: float = 0.0) -> None:
        """Record the views the local thread finished (raise what it raised), waiting at most
        `wait` seconds for the first."""
        try:
            item = self.local_done.get(timeout=wait) if wait else self.local_done.get_nowait()
            while True:
                if isinstance(item, BaseException):
                    raise item
                self._record(item)
                item = self.local_done.get_nowait()
        except queue.Empty:
            pass

    def _slots(self, before: int) -> int:
        """Ours that hold CPUs (at most the slots we had) plus the CPUs free now that our prefetched
        views will not take first: re-read every round, so that CPUs other jobs free during the
        stage get views, and CPUs they take do not."""
        free = int(self.ray.available_resources().get("CPU", 0.0) // self.fanout.cpus)
        waiting = max(0, len(self.pending) - before)
        return min(len(self.pending), before) + max(0, free - waiting)

    def _ready(self) -> list[Any]:
        """The view tasks that have finished, after at most a poll interval."""
        refs = list(self.pending)
        return self.ray.wait(refs, num_returns=len(refs), timeout=POLL_SECONDS)[0]

    def _submit(self, task: Any) -> Any:
        names = list(task.photo_names)
        for name in names:
            if name not in self.photos:
                self.photos[name] = self.ray.put((task.image_dir / name).read_bytes())
        for name in task.prior_names:  # a geometric pass's depth files of the photometric one
            path = task.prior_dir / name
            if path.exists():  # (a view may have got none)
                if PRIOR_KEY + name not in self.photos:
                    self.photos[PRIOR_KEY + name] = self.ray.put(path.read_bytes())
                names.append(PRIOR_KEY + name)
        blobs = [self.photos[n] for n in names]
        if task.mask_path is not None:
            names.append(MASK_KEY)
            blobs.append(self.ray.put(task.mask_path.read_bytes()))
        return self.remote.remote(self.work, task, names, *blobs)

    def _gather(self, ref: Any, task: Any) -> None:
        try:
            name, fraction, node, data = self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, ScandropError):
                raise exc.cause from None
            raise ScandropError(
                ErrorCode.dense_failed,
                f"The depth task of view {task.photo_names[0]} failed on the cluster"
                f" ({type(exc.cause).__name__}: {str(exc.cause)[:300]}).",
                "This is a bug in scandrop: please report it with report.json and the log.",
            ) from None
        except self.ray.exceptions.RayError as exc:  # its node died again and again, or out of memory
            raise ScandropError(
                ErrorCode.worker_crashed,
                f"The depth task of view {task.photo_names[0]} was lost on the cluster"
                f" ({type(exc).__name__}).",
                "A node died or ran out of memory: check the cluster (ray status), then rerun the job.",
            ) from None
        if data is not None:
            with atomic_path(task.out_path) as tmp:
                tmp.write_bytes(data)
        self._record(ViewDone(name=name, valid_fraction=fraction, node=node))

    def _record(self, view: ViewDone) -> None:
        self.done.append(view)
        view_done(self.progress, len(self.done), self.total, view.name)
