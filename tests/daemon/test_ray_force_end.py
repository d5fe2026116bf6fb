"""How the ray executor ends a job task that ignored its stop (`ray_executor.force_end`).

A fake Ray that records what is asked of it stands in for the cluster: the race this guards
against (a forced cancel of a task whose result is already on its way aborts the driver, Ray 2.60)
cannot be provoked on demand in a real one.
"""

from __future__ import annotations

from typing import Any

from scandrop.daemon.ray_executor import KILLED_TASK_ENDS_SECONDS, force_end


class FakeRay:
    """A task that ends once its pipeline's group is killed (or `ends_when_killed` is False)."""

    def __init__(self, ends_when_killed: bool = True, ended: bool = False) -> None:
        self.ends_when_killed = ends_when_killed
        self.ended = ended
        self.calls: list[tuple[str, Any]] = []

    def kill_group(self) -> None:
        self.calls.append(("kill_group", None))
        self.ended = self.ended or self.ends_when_killed

    def wait(self, refs: list[Any], timeout: float) -> tuple[list[Any], list[Any]]:
        self.calls.append(("wait", timeout))
        return (refs, []) if self.ended else ([], refs)

    def cancel(self, ref: Any, force: bool, recursive: bool) -> None:
        self.calls.append(("cancel", force))


def test_a_task_that_ends_once_its_pipeline_is_killed_is_never_force_cancelled() -> None:
    ray = FakeRay()
    force_end(ray, "ref", ray.kill_group)
    assert ray.calls == [("kill_group", None), ("wait", KILLED_TASK_ENDS_SECONDS)]


def test_a_task_still_running_after_the_kill_is_force_cancelled_once() -> None:
    ray = FakeRay(ends_when_killed=False)
    force_end(ray, "ref", ray.kill_group)
    assert ray.calls == [
        ("kill_group", None),
        ("wait", KILLED_TASK_ENDS_SECONDS),
        ("wait", 0),
        ("cancel", True),
    ]


def test_without_a_known_pipeline_only_a_running_task_is_cancelled() -> None:
    running, ended = FakeRay(), FakeRay(ended=True)
    force_end(running, "ref", None)
    force_end(ended, "ref", None)
    assert running.calls == [("wait", 0), ("cancel", True)]
    assert ended.calls == [("wait", 0)]


def test_a_kill_that_fails_still_ends_the_task() -> None:
    ray = FakeRay(ends_when_killed=False)

    def unreachable_node() -> None:
        ray.calls.append(("kill_group", None))
        raise ConnectionError("the node is gone")

    force_end(ray, "ref", unreachable_node)
    assert ray.calls[-1] == ("cancel", True)
