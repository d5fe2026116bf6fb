"""The `scandrop` command: reconstruct a folder once, benchmark, or run the inbox daemon."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from scandrop.daemon import logs
from scandrop.models.device import DeviceRequest
from scandrop.pipeline.core.errors import ErrorCode, ScandropError
from scandrop.pipeline.job_spec import JobSpec, Preset, merge_overrides, triangle_cap


def settings_problem(exc: ValidationError) -> str:
    """pydantic's first error as one line: `where: what`, without its "Value error, " prefix."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    what = first["msg"].removeprefix("Value error, ")
    return f"{where}: {what}" if where else what


def stage_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """`--set STAGE.FIELD=VALUE` items as per-stage overrides, the CLI's form of a drop's
    `[stages.STAGE]` table. A value reads as TOML (800, 0.5, true, "sgbm"), else as a bare string;
    the job checks names and values against the stage configs."""
    overrides: dict[str, dict[str, Any]] = {}
    for item in items:
        name, eq, text = item.partition("=")
        stage, dot, field = name.strip().partition(".")
        if not (eq and dot and stage and field):
            raise ScandropError(
                ErrorCode.invalid_settings,
                f"--set {item!r} is not STAGE.FIELD=VALUE.",
                "For example: --set depth.max_image_size=800 (see `scandrop config` and the README).",
            )
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        overrides.setdefault(stage, {})[field] = value
    return overrides


def _reconstruct(args: argparse.Namespace) -> int:
    from scandrop.daemon.worker import run_job
    from scandrop.models.device import resolve_device
    from scandrop.pipeline.core.workspace import clean_work_dir
    from scandrop.pipeline.presets import resolve

    device = resolve_device(args.device)
    overrides = merge_overrides(triangle_cap(args.max_triangles), stage_overrides(args.set))
    spec = JobSpec(preset=args.preset, overrides=overrides)
    resolve(spec)  # a bad value stops here with one line, not inside the job process
    work = args.work_dir or (args.outdir / ".scandrop-work")
    last = [""]

    def show(event):  # one line per stage message change; a terminal gets a live line
        line = f"[{event.progress * 100:5.1f}%] {event.stage}: {event.message}"
        if line != last[0]:
            print(line, file=sys.stderr, flush=True)
            last[0] = line

    stop = threading.Event()  # Ctrl-C or SIGTERM: stop the job cleanly, still write report.json
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    report = run_job(
        args.input, args.outdir, spec, work, device.model_dump(), on_event=show, should_stop=stop.is_set
    )
    if report.ok and not args.keep_work:
        clean_work_dir(work)
    if report.ok:
        print(
            f"done in {report.seconds:.1f} s: {report.images.registered}/{report.images.usable} photos "
            f"registered, {report.points} points, {report.triangles} triangles, {report.splats} splats "
            f"-> {args.outdir}"
        )
        return 0
    err = report.error
    print(f"failed [{err.code.value}]: {err.message}\nhint: {err.hint}" if err else "failed", file=sys.stderr)
    return 1


def _bench(args: argparse.Namespace) -> int:
    from scandrop.pipeline.bench.run import main as bench_main
    from scandrop.pipeline.presets import resolve

    spec = JobSpec(preset=args.preset, overrides=stage_overrides(args.set))
    resolve(spec)  # a bad setting stops here, before any row runs
    return bench_main(args.datasets, args.out, spec, args.datasets_dir)


def _daemon(args: argparse.Namespace) -> int:
    import asyncio

    from scandrop.daemon.service import serve
    from scandrop.daemon.settings import load_settings

    settings = load_settings(args.config, inbox=args.inbox, outbox=args.outbox)
    asyncio.run(serve(settings))
    return 0


def _config(args: argparse.Namespace) -> int:
    from scandrop.daemon.settings import load_settings

    print(load_settings(args.config).model_dump_json(indent=2))
    return 0


def _models(args: argparse.Namespace) -> int:
    from scandrop.daemon.settings import load_settings
    from scandrop.models import model_store
    from scandrop.models.registry import REGISTRY, get_spec

    models_dir = load_settings(args.config, models_dir=args.models_dir).models_dir
    if args.action == "list":
        rows = [("NAME", "LICENCE", "INSTALLED", "SHA256", "FROM", "PURPOSE")]
        for spec in REGISTRY.values():
            st = model_store.state(spec, models_dir)
            installed = "yes" if st.installed else "no"
            rows.append(
                (spec.name, spec.licence, installed, st.sha256_source, st.origin or "-", spec.purpose)
            )
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        for row in rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths, strict=True)) + "  " + row[5])
        print(f"models_dir: {models_dir}")
        return 0
    if args.action == "pull":
        spec = get_spec(args.name)
        path = model_store.pull(spec, models_dir)
        how = "pinned" if spec.sha256 else "recorded on first use"
        print(f"{spec.name}: {path} (sha256 {model_store.read_lock(models_dir)[spec.name]['sha256']}, {how})")
        return 0
    if args.action == "import":
        spec = get_spec(args.name)
        path = model_store.import_file(spec, models_dir, args.file)
        print(f"{spec.name}: {path} (sha256 {spec.sha256}, pinned)")
        return 0
    if args.action == "path":
        print(model_store.model_path(get_spec(args.name), models_dir))
        return 0
    failed = 0
    for spec in [get_spec(args.name)] if args.name else list(REGISTRY.values()):
        try:
            print(f"ok  {spec.name}  {model_store.model_path(spec, models_dir)}")
        except ScandropError as exc:
            failed += 1
            print(f"error [{exc.code.value}]: {exc.message}\nhint: {exc.hint}", file=sys.stderr)
    return 1 if failed else 0


SET_HELP = "A stage setting on top of the preset, e.g. depth.max_image_size=800 (repeatable)."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scandrop", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    rec = sub.add_parser("reconstruct", help="Reconstruct one folder of photos into OUTDIR.")
    rec.add_argument("input", type=Path)
    rec.add_argument("outdir", type=Path)
    rec.add_argument("--device", choices=[d.value for d in DeviceRequest], default="auto")
    rec.add_argument("--preset", choices=[p.value for p in Preset], default="balanced")
    rec.add_argument(
        "--max-triangles", type=int, default=None, help="Triangle cap of model.glb (default: the preset's)."
    )
    rec.add_argument("--work-dir", type=Path, default=None, help="Workspace (default OUTDIR/.scandrop-work).")
    rec.add_argument("--keep-work", action="store_true", help="Keep the workspace after success.")
    rec.add_argument("--set", action="append", default=[], metavar="STAGE.FIELD=VALUE", help=SET_HELP)
    rec.set_defaults(func=_reconstruct)

    bench = sub.add_parser("bench", help="Run the benchmark and print one table (and write JSON).")
    bench.add_argument("datasets", nargs="*", help="synthetic, kitchen, herzjesu, room (default: all)")
    bench.add_argument("--out", type=Path, default=Path("bench-results"))
    bench.add_argument("--preset", choices=[p.value for p in Preset], default="balanced")
    bench.add_argument("--datasets-dir", type=Path, default=None, help="Default: ../shared/datasets")
    bench.add_argument("--set", action="append", default=[], metavar="STAGE.FIELD=VALUE", help=SET_HELP)
    bench.set_defaults(func=_bench)

    dmn = sub.add_parser(
        "daemon",
        help="Watch the inbox, reconstruct every complete drop, serve status on http_host:http_port.",
    )
    dmn.add_argument("--config", type=Path, default=None)
    dmn.add_argument("--inbox", type=Path, default=None)
    dmn.add_argument("--outbox", type=Path, default=None)
    dmn.set_defaults(func=_daemon)

    cfg = sub.add_parser("config", help="Print the effective settings.")
    cfg.add_argument("--config", type=Path, default=None)
    cfg.set_defaults(func=_config)

    mdl = sub.add_parser("models", help="List, install (pull, import), verify and locate the learned models.")
    mdl.add_argument("--config", type=Path, default=None)
    mdl.add_argument("--models-dir", type=Path, default=None, help="Default: the models_dir setting.")
    msub = mdl.add_subparsers(dest="action", required=True)
    msub.add_parser("list", help="Every registered model, its licence and whether it is installed.")
    pull = msub.add_parser("pull", help="Download NAME from the Hugging Face hub and check its sha256.")
    pull.add_argument("name")
    imp = msub.add_parser(
        "import", help="Install FILE as NAME (no hub needed) if its sha256 is the pinned one."
    )
    imp.add_argument("name")
    imp.add_argument("file", type=Path)
    ver = msub.add_parser("verify", help="Check installed models' sha256 (all when NAME is omitted).")
    ver.add_argument("name", nargs="?")
    pth = msub.add_parser("path", help="Print the verified path of NAME.")
    pth.add_argument("name")
    mdl.set_defaults(func=_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure()
    try:
        return int(args.func(args))
    except ScandropError as exc:
        print(f"error [{exc.code.value}]: {exc.message}\nhint: {exc.hint}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"error [invalid_settings]: {settings_problem(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
