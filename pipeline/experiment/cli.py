"""`pico experiment run|status|table DESIGN.yaml`: matched-FLOP comparisons from a design file.

    pico experiment run configs/experiments/routing-ladder-cpu.yaml --jobs 2
    pico experiment run configs/experiments/routing-cluster.yaml --dry-run        # runs, FLOPs, GPU-hours
    pico experiment run configs/experiments/routing-cluster.yaml --submit slurm   # one array task per run
    pico experiment status configs/experiments/routing-ladder-cpu.yaml
    pico experiment table configs/experiments/routing-ladder-cpu.yaml             # table.md, table.json, scaling.png, isoflop.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pico.configs.errors import UserError

EPILOG = """Each run is `pico train` + `pico eval` (a subprocess, a Slurm array task or a Ray job) and leaves
one result JSON under the design's results folder; a rerun reuses finished runs and redoes killed
or failed ones. Designs: configs/experiments/."""


DESIGN_HELP = "design YAML (see configs/experiments/)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pico experiment", description=__doc__.strip().split("\n\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", required=True, metavar="run|status|table|rescore")
    r = sub.add_parser("run", help="run the design's missing runs (reusing finished ones)")
    r.add_argument("design", help=DESIGN_HELP)
    r.add_argument("--submit", choices=["local", "slurm", "ray"], default="local",
                   help="local: subprocesses here (default); slurm: one array task per run; ray: one Ray job per run")
    r.add_argument("--jobs", type=int, default=1, help="runs at a time (local, ray; slurm: the array's throttle)")
    r.add_argument("--address", help="--submit ray: the dashboard, http://HOST:8265 (default: $RAY_ADDRESS)")
    r.add_argument("--dry-run", action="store_true", help="print the runs, their FLOPs and the estimated time; run nothing")
    r.add_argument("--json", action="store_true", help="print one JSON object at the end")
    r.add_argument("--allow-mixed-revisions", action="store_true",
                   help="run although the finished runs trained with other training code than this checkout's")
    s = sub.add_parser("status", help="finished, failed and missing runs")
    s.add_argument("design", help=DESIGN_HELP)
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--all", action="store_true", help="list every run ready to launch (default: the next few)")
    t = sub.add_parser("table", help="write the table (table.md, table.json) and the scaling plot")
    t.add_argument("design", help=DESIGN_HELP)
    t.add_argument("--out", help="folder for table.md, table.json, scaling.png, isoflop.png (default: the design's results folder)")
    t.add_argument("--allow-mixed-revisions", action="store_true", help="tabulate runs of several pico revisions")
    t.add_argument("--no-plot", action="store_true", help="skip the plots")
    q = sub.add_parser("rescore", help="score finished runs again where the held-out sets changed since they ran")
    q.add_argument("design", help=DESIGN_HELP)
    q.add_argument("--json", action="store_true", help="print one JSON object")
    o = sub.add_parser("run-one", help=argparse.SUPPRESS)  # internal: one run (job.py), started by the backends
    o.add_argument("design", help=DESIGN_HELP)
    o.add_argument("--run", required=True, help="the run as JSON: domain, model, shape, budget, lr, seed")
    o.add_argument("--cwd", help="directory the design's relative paths are relative to")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if getattr(args, "cwd", None):
        os.chdir(args.cwd)
    from pico.pipeline.experiment.design import load_design

    design_path = Path(args.design)
    design = load_design(design_path)
    return {"run": cmd_run, "status": cmd_status, "table": cmd_table, "rescore": cmd_rescore,
            "run-one": cmd_run_one}[args.verb](
        design, design_path, args)


def cmd_run(design, design_path: Path, args) -> int:
    from pico.pipeline.experiment import drive

    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: run at least one at a time")
    if args.dry_run:
        est = drive.estimate(design)
        for domain in design.domains:  # the estimate stands without the data; say what is missing
            try:
                drive.domain_data.check_inputs(design, domain)
            except UserError as e:
                print(f"pico experiment: warning: {e}", file=sys.stderr)
        if args.json:
            print(json.dumps(est))
            return 0
        print(describe(design, est, args.jobs))
        return 0
    if not args.allow_mixed_revisions:
        drive.check_code(design)
    summary = drive.drive(design, design_path, backend=args.submit, jobs=args.jobs, address=args.address)
    if args.json:
        print(json.dumps(summary))
    return 0 if not summary["failed"] else 1


def describe(design, est: dict, jobs: int) -> str:
    c = design.cluster
    lines = [f"design {design.name}: {est['runs']} runs, {est['train_flops']:.3g} training FLOPs in all "
             f"(budgets {', '.join(est['budgets'])}; {design.shape_rule} shapes)",
             "  domain / model / shape: router, params, training FLOPs per byte, steps per budget, runs per budget"]
    for r in est["cells"]:
        if r.get("best"):
            lines.append(f"  {r['domain']} / {r['model']} / {r['shape']}: runs {r['runs']} (the sweep budget's best shape "
                         "and its better neighbour, then the other seeds at the winner)")
            continue
        lines.append(f"  {r['domain']} / {r['model']} / {r['shape']}: {r['router']}, {r['params']:,} params, "
                     f"{r['flops_per_byte'] / 1e6:.3g} MFLOP/byte, steps {r['steps']}, runs {r['runs']}")
    if est["run_hours"] is None:
        lines.append("  time: not estimated (set cluster.flops_per_s to a measured rate, or cluster.gpus)")
    else:
        how = (f"{c.flops_per_s:.3g} FLOP/s per run, cluster.flops_per_s" if c.flops_per_s else
               f"{c.gpus} H100 per run at MFU {c.assumed_mfu:.0%}")
        lines.append(f"  time: {est['run_hours']:.2f} run-hours ({how}, + {c.run_overhead_s:.0f} s per run); "
                     f"{est['run_hours'] / jobs:.2f} h wall with {jobs} at a time")
        if est["gpu_hours"] is not None:
            lines.append(f"  GPU-hours: {est['gpu_hours']:.1f} ({c.gpus} GPU(s) per run)")
    return "\n".join(lines)


def cmd_status(design, design_path: Path, args) -> int:
    from pico.pipeline.experiment import drive
    from pico.pipeline.experiment.design import check_models
    from pico.pipeline.experiment.job import log_path
    from pico.pipeline.experiment.plan import plan
    from pico.pipeline.experiment.store import load_failures

    results = drive.finished(design, check_models(design))
    failures = load_failures(design.results_dir)
    ready, total = plan(design, results)
    keys = [r.key(design) for r in ready]
    # time left from the training rates the finished runs measured (FLOP/s: a resumed run's wall time is short)
    hours, rate = drive.hours_left(design, results)
    info = {"design": design.name, "finished": len(results), "planned": total,
            "failed": {k: str(log_path(design, k)) for k in keys if k in failures},  # where it is, here
            "ready": [k for k in keys if k not in failures], "results": str(design.results_dir),
            "measured_flops_per_s": rate, "run_hours_left": hours}
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{design.name}: {info['finished']} of {info['planned']} runs finished; results in {info['results']}")
    if rate:
        print(f"  training ran at {rate / 1e9:.1f} GFLOP/s per run (median): the runs left need about {hours:.1f} "
              "run-hours besides start-up, at the rate each model and shape measured (divide by --jobs)")
    for k, log in info["failed"].items():
        print(f"  failed: {k}  (log: {log})")
    shown = info["ready"] if args.all else info["ready"][:4]
    for k in shown:
        print(f"  ready:  {k}")
    if len(shown) < len(info["ready"]):
        print(f"  ... and {len(info['ready']) - len(shown)} more ready to launch (--all lists them)")
    return 0


def cmd_table(design, design_path: Path, args) -> int:
    from pico.pipeline.experiment import drive, table
    from pico.pipeline.experiment.design import check_models
    from pico.pipeline.experiment.store import load_failures, load_results, write_json

    out = Path(args.out) if args.out else design.results_dir
    try:  # what the planner counts: a result whose spec changed since it ran is left out
        results = drive.finished(design, check_models(design))
    except UserError as e:  # a design kept as a record (a retired option, a config gone): its results as they are
        print(f"pico experiment table: {e}; tabulating every result as recorded (stale ones included)", file=sys.stderr)
        results = load_results(design.results_dir)
    built = table.build(design, results, load_failures(design.results_dir), allow_mixed=args.allow_mixed_revisions)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".table.md.tmp"
    tmp.write_text(built["markdown"])
    os.replace(tmp, out / "table.md")
    write_json(out / "table.json", built["json"])
    if not args.no_plot:
        for path in (table.scaling_plot(design, built["json"], out / "scaling.png"),
                     table.isoflop_plot(design, built["json"], out / "isoflop.png")):
            if path:
                print(f"wrote {path}", file=sys.stderr)
    sys.stdout.write(built["markdown"])
    print(f"wrote {out / 'table.md'} and {out / 'table.json'}", file=sys.stderr)
    return 0


def cmd_rescore(design, design_path: Path, args) -> int:
    from pico.pipeline.experiment.design import check_models
    from pico.pipeline.experiment.drive import finished
    from pico.pipeline.experiment.job import rescore

    done = rescore(design, finished(design, check_models(design)))
    if args.json:
        print(json.dumps(done))
    else:
        print(f"{design.name}: {len(done['rescored'])} runs rescored, {len(done['current'])} already current")
        for k in done["rerun"]:
            print(f"  no model kept, or trained on other data: rerun it (delete its result): {k}")
    return 1 if done["rerun"] else 0


def cmd_run_one(design, design_path: Path, args) -> int:
    from pico.pipeline.experiment.design import Run
    from pico.pipeline.experiment.job import run_one

    try:
        spec = json.loads(args.run)
        run = Run(**spec)
    except (ValueError, TypeError) as e:
        raise UserError(f"--run {args.run!r}: not a run spec ({e})") from None
    return run_one(design, run)
