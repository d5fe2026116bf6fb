"""Where the dense stage's per-view depth tasks run: here by default, or through an injected mapper.

A view's depth is an independent unit (one picklable task that writes one npz), so a caller that
owns more machines (the daemon's Ray executor) can hand the depth stage a `ViewMapper` that runs
the tasks elsewhere and gathers each view's file into the workspace before it returns. The
pipeline only knows this protocol, never who implements it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from scandrop.pipeline.core.stage import Progress, StopCheck

ViewWork = Callable[[Any], tuple[str, float]]  # task -> (view name, valid share); writes task.out_path
# tasks -> their valid shares in order, on this host: a stage's own way of running its tasks here
LocalRun = Callable[[list[Any], Progress, StopCheck], list[float]]


def view_done(progress: Progress, done: int, total: int, name: str) -> None:
    """The depth stage's progress once its done-th of total views is written, wherever it ran."""
    progress(done / total, f"depth {done}/{total}: {name}")


@dataclass(frozen=True)
class ViewDone:
    name: str
    valid_fraction: float
    node: str  # where the view ran (a Ray node id)


class ViewTask(Protocol):
    """What a mapper may rely on in a depth task: the photos (and earlier depth files) it reads
    and the file it writes."""

    image_dir: Path
    mask_path: Path | None
    out_path: Path
    prior_dir: Path | None

    @property
    def photo_names(self) -> tuple[str, ...]:
        """The photos (in image_dir) the task reads, its own view's first."""
        ...

    @property
    def prior_names(self) -> tuple[str, ...]:
        """The depth files of an earlier pass (in prior_dir) the task reads; () for none."""
        ...


class ViewMapper(Protocol):
    """Runs per-view depth tasks, each writing its task.out_path in the job's workspace by the time
    `map` returns; calls progress(done share, message) per view and stops when should_stop() says."""

    min_views: int  # below this many views the stage keeps its local loop

    def map(
        self, work: ViewWork, tasks: list[Any], progress: Progress, should_stop: StopCheck
    ) -> list[ViewDone]: ...
