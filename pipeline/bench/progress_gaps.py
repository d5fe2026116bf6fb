"""How long each stage goes without a progress event: the longest silent gap, per stage.

A person at a station judges a job by its progress bar: a stage silent for minutes looks hung. This
runs jobs the way the daemon does (a job process, events over its queue, daemon/worker.run_job),
stamps every event as it arrives and prints, per stage, its duration, its number of events and the
longest gap between two consecutive events (from the stage's first event to the next stage's first
event, or the job's end). Wall seconds: on a machine shared with other work, say so beside them.

    python -m scandrop.pipeline.bench.progress_gaps [synthetic] [fox] [kitchen] [--preset fast] [--json F]
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from scandrop.daemon.worker import run_job
from scandrop.models.device import resolve_device
from scandrop.pipeline.bench import synthetic
from scandrop.pipeline.core.stage import ProgressEvent
from scandrop.pipeline.job_spec import JobSpec, Preset

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"
TARGET_SECONDS = 5.0  # the bound on a silent stretch


def stage_gaps(stamped: list[tuple[float, str, str]], end: float) -> list[dict[str, Any]]:
    """Per stage, in order: seconds, events, the longest gap between consecutive events and the
    message that preceded it (what the job was doing while it said nothing)."""
    rows: list[dict[str, Any]] = []
    for i, (t, stage, message) in enumerate(stamped):
        if not rows or rows[-1]["stage"] != stage:
            rows.append({"stage": stage, "start": t, "times": [], "messages": []})
        rows[-1]["times"].append(t)
        rows[-1]["messages"].append(message)
        nxt = stamped[i + 1][0] if i + 1 < len(stamped) else end
        rows[-1]["end"] = nxt
    out = []
    for row in rows:
        times = [*row["times"], row["end"]]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        longest = max(range(len(gaps)), key=gaps.__getitem__, default=None)
        out.append(
            {
                "stage": row["stage"],
                "seconds": round(row["end"] - row["start"], 2),
                "events": len(row["times"]),
                "longest_gap_seconds": round(gaps[longest], 2) if longest is not None else 0.0,
                "longest_gap_after": row["messages"][longest] if longest is not None else "",
            }
        )
    return out


def measure(name: str, photos: Path, preset: Preset) -> dict[str, Any]:
    stamped: list[tuple[float, str, str]] = []

    def on_event(event: ProgressEvent) -> None:
        stamped.append((time.monotonic(), event.stage, event.message))

    device = resolve_device("cpu").model_dump()
    with tempfile.TemporaryDirectory(prefix="scandrop-gaps-") as tmp:
        t0 = time.monotonic()
        spec = JobSpec(preset=preset)
        report = run_job(photos, Path(tmp) / "out", spec, Path(tmp) / "work", device, on_event)
        end = time.monotonic()
    return {
        "dataset": name,
        "preset": preset.value,
        "ok": report.ok,
        "error": report.error.code.value if report.error else None,
        "seconds": round(end - t0, 1),
        "cpu_seconds": report.cpu_seconds,
        "first_event_after_seconds": round(stamped[0][0] - t0, 2) if stamped else None,
        "stages": stage_gaps(stamped, end),
    }


# Rendered sets: views, width, height. "fox" is the size of the drop the issue saw sit silent for
# minutes (50 photos of 1920x1080, as instant-ngp's fox); rendering it takes about 7 minutes here.
RENDERED = {"synthetic": (24, 640, 480), "fox": (50, 1920, 1080)}


def dataset(name: str, scratch: Path) -> Path | None:
    if name in RENDERED:
        views, width, height = RENDERED[name]
        folder = scratch / name
        synthetic.write_scene(
            synthetic.render_scene(n_views=views, width=width, height=height, seed=0), folder
        )
        (folder / "gt_cameras.json").unlink()
        return folder
    folder = SHARED / {"kitchen": "vggt_kitchen"}[name] / "images"
    return folder if folder.is_dir() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="*", default=["synthetic"], choices=[*RENDERED, "kitchen"])
    parser.add_argument("--preset", choices=[p.value for p in Preset], default="fast")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="scandrop-gaps-data-") as scratch:
        for name in args.datasets:
            photos = dataset(name, Path(scratch))
            if photos is None:
                print(f"{name}: skipped (no {SHARED})")
                continue
            result = measure(name, photos, Preset(args.preset))
            results.append(result)
            print(
                f"\n{name} ({result['preset']}): {'ok' if result['ok'] else result['error']}, "
                f"{result['seconds']} s wall, {result['cpu_seconds']} s CPU in the job process, "
                f"first event after {result['first_event_after_seconds']} s"
            )
            print(f"  {'stage':10} {'seconds':>8} {'events':>7} {'longest gap':>12}  after")
            for row in result["stages"]:
                flag = " > target" if row["longest_gap_seconds"] > TARGET_SECONDS else ""
                print(
                    f"  {row['stage']:10} {row['seconds']:8.1f} {row['events']:7d} "
                    f"{row['longest_gap_seconds']:11.1f}s  {row['longest_gap_after']!r}{flag}"
                )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
