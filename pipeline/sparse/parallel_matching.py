"""SIFT matching on the CPU split over processes, each on one thread.

COLMAP's CPU matcher is repeatable on one thread only: on two, a pair now and then lost every raw
match and the poses moved (see reconstruct_sparse.matching_options; COLMAP's issue 727 reports the
same). One thread leaves every other core idle, a loss that grows with the machine. So the pairs
are cut into contiguous runs, one per process; each process matches and verifies its run on one
thread in its own copy of the database (features only), and the parent copies the results back
with SQLite's ATTACH. A pair's matches and two-view geometry depend only on the two photos and the
seed (COLMAP seeds each pair's RANSAC afresh), so the result is bit-equal to one process matching
every pair, whatever the number of processes (`test_matching_in_processes_gives_what_one_thread_gives`).

Progress comes from each child's log file (COLMAP's "Processing block" lines): reading a database
while COLMAP writes it crashed the writer once (see colmap_log)."""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import pycolmap
import structlog

from scandrop.pipeline.core.child_process import die_with_parent
from scandrop.pipeline.core.cpu_budget import worker_processes
from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.core.stage import StopCheck, check_stop

# A process costs a start, an import and reading its photos' descriptors (the kitchen, balanced:
# 60 pairs 5.1 s in one process, 3.8 s in two; 120 pairs 7.9 / 5.5 s; all 300 16.5-16.9 / 10.9 s).
MIN_PAIRS_PER_PROCESS = 30
BLOCK_LINE = re.compile(r"Processing block \[(\d+)/(\d+)\]")  # COLMAP's log line per block of pairs
_RESULT_TABLES = ("matches", "two_view_geometries")


def processes_for(num_pairs: int, workers: int) -> int:
    """How many processes match `num_pairs` pairs; `workers` 0 means one per usable core (at most 8,
    as the depth stage's workers: `cpu_budget.worker_processes`)."""
    cores = workers or worker_processes()
    return max(1, min(cores, num_pairs // MIN_PAIRS_PER_PROCESS))


def split_pairs(pairs: Sequence[tuple[str, str]], parts: int) -> list[list[tuple[str, str]]]:
    """Contiguous runs of nearly equal length, in the order COLMAP would walk them. A pair listed
    twice (either way round: sequential pairs and loop closures overlap) is kept once; one COLMAP
    call skips a pair it has matched, but two processes would both write it."""
    unique: dict[frozenset[str], tuple[str, str]] = {}
    for pair in pairs:
        unique.setdefault(frozenset(pair), pair)
    pairs = list(unique.values())
    size, extra = divmod(len(pairs), parts)
    runs, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        runs.append(list(pairs[start:end]))
        start = end
    return runs


def _copy_features(database: Path, copy: Path) -> None:
    """A consistent copy of the database (SQLite's backup API; the source may be in WAL mode)
    with no results in it."""
    copy.unlink(missing_ok=True)
    source, target = contextlib.closing(sqlite3.connect(database)), contextlib.closing(sqlite3.connect(copy))
    with source as src, target as dst:
        src.backup(dst)
        for table in _RESULT_TABLES:
            dst.execute(f"DELETE FROM {table}")
        dst.commit()


def _merge(database: Path, parts: list[Path]) -> None:
    """Copy every part's matches and two-view geometries into `database`."""
    with contextlib.closing(sqlite3.connect(database)) as db:
        for part in parts:
            db.execute("ATTACH DATABASE ? AS part", (str(part),))
            for table in _RESULT_TABLES:
                db.execute(f"INSERT INTO main.{table} SELECT * FROM part.{table}")
            db.commit()
            db.execute("DETACH DATABASE part")


def _pairs_done(log: Path, block_size: int, total: int, finished: bool) -> int:
    """Pairs a child has finished, from its last "Processing block [k/n]" line."""
    if finished:
        return total
    with contextlib.suppress(OSError):
        found = BLOCK_LINE.findall(log.read_text(errors="replace"))
        if found:
            return min(total, (int(found[-1][0]) - 1) * block_size)
    return 0


def match(
    database: Path,
    pairs: Sequence[tuple[str, str]],
    parts: int,
    seed: int,
    block_size: int,
    scratch: Path,
    tick: Callable[[int], None],
    should_stop: StopCheck,
    every: float,
    thorough: bool = False,
) -> None:
    """Match and verify `pairs` in `parts` processes, results into `database` (`thorough`: see
    verification_options). `tick(pairs_done)` is called every `every` seconds; a stop request kills
    the children and raises cancelled."""
    runs = [run for run in split_pairs(pairs, parts) if run]
    copies = [scratch / f"match_part_{i}.db" for i in range(len(runs))]
    logs = [scratch / f"match_part_{i}.log" for i in range(len(runs))]
    lists = [scratch / f"match_part_{i}.txt" for i in range(len(runs))]
    procs: list[subprocess.Popen[bytes]] = []
    code = f"from scandrop.pipeline.sparse.parallel_matching import main; main({os.getpid()})"
    try:
        for run, copy, log, listed in zip(runs, copies, logs, lists, strict=True):
            _copy_features(database, copy)
            listed.write_text("".join(f"{a} {b}\n" for a, b in run))
            with open(log, "wb") as log_fh:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-c", code, *child_argv(copy, listed, seed, block_size, thorough)],
                        stdout=log_fh,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
                )
        heard = time.monotonic()
        while True:
            check_stop(should_stop)
            states = [proc.poll() for proc in procs]
            failed = next((i for i, state in enumerate(states) if state not in (None, 0)), None)
            if failed is not None:
                _failed(failed, procs[failed].returncode, logs[failed])
            if all(state == 0 for state in states):
                break
            time.sleep(0.1)
            if time.monotonic() - heard >= every:
                heard = time.monotonic()
                tick(
                    sum(
                        _pairs_done(log, block_size, len(run), state == 0)
                        for run, log, state in zip(runs, logs, states, strict=True)
                    )
                )
        _merge(database, copies)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for path in (*copies, *logs, *lists):
            path.unlink(missing_ok=True)


def _failed(index: int, returncode: int, log: Path) -> NoReturn:
    tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
    how = f"crashed (signal {-returncode})" if returncode < 0 else f"failed ({returncode})"
    logger = structlog.get_logger("scandrop.sparse")
    logger.error("matching_process_failed", part=index, how=how, log_tail=tail)
    raise ScandropError(
        ErrorCode.worker_crashed,
        f"Feature matching process {index + 1} {how}.",
        "Run the job again; if it fails the same way, the photos or the machine's memory may be the cause.",
    )


def child_argv(database: Path, pair_list: Path, seed: int, block_size: int, thorough: bool) -> list[str]:
    """What a matching process is told on its command line (`read_child_argv` reads it back)."""
    return [str(database), str(pair_list), str(seed), str(block_size), "1" if thorough else "0"]


def read_child_argv(argv: Sequence[str]) -> tuple[str, str, int, int, bool]:
    database, pair_list, seed, block_size, thorough = argv
    return database, pair_list, int(seed), int(block_size), thorough == "1"


def main(parent: int) -> None:
    """The child: argv = `child_argv`."""
    die_with_parent(parent)
    database, pair_list, seed, block_size, thorough = read_child_argv(sys.argv[1:])
    pycolmap.logging.minloglevel = 0  # the block lines are the parent's progress
    pycolmap.match_image_pairs(
        database,
        matching_options=matching_options("cpu"),
        pairing_options=pairing_options(Path(pair_list), block_size),
        verification_options=verification_options(seed, thorough),
        device=pycolmap.Device.cpu,
    )


def matching_options(device: str) -> pycolmap.FeatureMatchingOptions:
    """On the CPU, one thread, as mapping: with two, COLMAP's CPU matcher gave a rendered orbit's
    pair 16 raw matches in one run and none in another (more often when the job process was busy
    streaming the live model), and the poses moved with it. The other cores match other pairs in
    processes of their own (`match`). On CUDA the GPU matches and the threads verify: COLMAP's
    default (all cores) stays; that path was not run."""
    options = pycolmap.FeatureMatchingOptions()
    if device == "cpu":
        options.num_threads = 1
    return options


def pairing_options(pair_list: Path, block_size: int) -> pycolmap.ImportedPairingOptions:
    """COLMAP's options for matching the pairs listed in `pair_list`, `block_size` at a time."""
    pairing = pycolmap.ImportedPairingOptions()
    pairing.match_list_path = pair_list
    pairing.block_size = block_size
    return pairing


# A small set's few pairs decide its whole model, and verifying them is cheap: RANSAC searches
# longer there (COLMAP's defaults: confidence 0.999, at least 100 trials). On the 7-photo NLE tower
# its share of a photo explained went 0.308 -> 0.380 (0.313 -> 0.370 with another seed), Sacre
# Coeur's 10 photos stayed at 0.406 and the sparse stage took as long (2026-12-05).
THOROUGH_CONFIDENCE = 0.99999
THOROUGH_MIN_TRIALS = 2000


def verification_options(seed: int, thorough: bool = False) -> pycolmap.TwoViewGeometryOptions:
    """Two-view verification whose RANSAC is seeded: same photos, same geometries."""
    verification = pycolmap.TwoViewGeometryOptions()
    verification.ransac.random_seed = seed
    if thorough:
        verification.ransac.confidence = THOROUGH_CONFIDENCE
        verification.ransac.min_num_trials = THOROUGH_MIN_TRIALS
    return verification
