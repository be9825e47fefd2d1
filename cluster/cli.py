"""`pico submit slurm|ray`: turn a config into a Slurm batch job or a Ray Job.

    pico submit slurm --config configs/pico-1b.yaml --nodes 4 --gpus-per-node 8 --time 48:00:00 --dry-run
    pico submit slurm --config configs/quickstart.yaml -- --train.steps=1000
    pico submit ray --address http://HEAD:8265 -- prep --input /data/raw --output /data/shards
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from pico.cluster import plan, ray_jobs, slurm
from pico.configs.tree import ConfigError, load_config
from pico.configs.errors import UserError

EPILOG = """examples:
  pico submit slurm --config configs/pico-1b.yaml --nodes 4 --gpus-per-node 8 --time 48:00:00 --dry-run
  pico submit slurm --config configs/quickstart.yaml --gpus-per-node 0 --ranks-per-node 2 -- --train.steps=1000
  pico submit ray --address http://HEAD:8265 -- prep --input /data/raw --output /data/shards

Slurm: `--` ends pico's options; what follows is config overrides (--train.steps=1000 ...).
Ray: `--` ends pico's options; what follows is the pico command the job runs (prep ... | train ...).
Follow a job with `pico jobs status|logs|cancel JOB`."""


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pico submit", description=__doc__.strip().split("\n\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="backend", required=True, metavar="slurm|ray")

    s = sub.add_parser("slurm", help="render an sbatch script (sbatch -> srun -> torchrun -> pico train) and submit it",
                       description="Render the sbatch script of a training run and submit it. Flags left out take "
                                   "their value from the config's cluster section.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--config", required=True, help="training config (YAML path or packaged name)")
    s.add_argument("--nodes", type=int, help="nodes to request (cluster.nodes)")
    s.add_argument("--gpus-per-node", type=int, help="GPUs per node = ranks per node; 0 runs CPU ranks (cluster.gpus_per_node)")
    s.add_argument("--ranks-per-node", type=int, help="CPU jobs only: ranks per node (default 1)")
    s.add_argument("--cpus-per-task", type=int, help="CPU cores per node's launcher, shared by its ranks (cluster.cpus_per_task)")
    s.add_argument("--partition", help="Slurm partition (cluster.partition)")
    s.add_argument("--time", help="time limit, HH:MM:SS or D-HH:MM:SS (cluster.time)")
    s.add_argument("--account", help="Slurm account (cluster.account)")
    s.add_argument("--qos", help="Slurm QoS (cluster.qos)")
    s.add_argument("--mem", help="memory per node, e.g. 200G; 0 = the whole node (cluster.mem)")
    s.add_argument("--signal-grace", type=int, default=None,
                   help="seconds before the time limit at which Slurm warns the job to checkpoint and requeue (default 300)")
    s.add_argument("--max-requeues", type=int, default=None, help="stop requeueing after this many restarts (default 20)")
    s.add_argument("--name", help="job name (default: the name of train.out_dir, prefixed with pico-)")
    s.add_argument("--dry-run", action="store_true", help="print the script and the plan; submit nothing")
    s.add_argument("--json", action="store_true", help="print one JSON object (job id or script, and the plan)")

    r = sub.add_parser("ray", help="submit `pico prep|train ...` as a Ray Job",
                       description="Submit a pico command as a Ray Job through the head's dashboard.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--address", help="Ray dashboard, http://HOST:8265 (default: $RAY_ADDRESS)")
    r.add_argument("--working-dir", help="directory Ray uploads; the command runs inside the copy")
    r.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job (repeatable); Ray shows and logs these values, so pass "
                        "no secrets: the job's workers use the credentials the cluster's own environment provides")
    r.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="with --working-dir: also leave these out of the upload (.git, .venv, runs, *.tar always are)")
    r.add_argument("--num-cpus", type=float, help="CPUs reserved for the entrypoint process itself")
    r.add_argument("--num-gpus", type=float,
                   help="GPUs reserved for the entrypoint (places `pico train` on a GPU worker; one process)")
    r.add_argument("--submission-id", help="job id to use (default: Ray picks raysubmit_...)")
    r.add_argument("--wait", action="store_true", help="wait for the job to end, print its logs, exit non-zero if it failed")
    r.add_argument("--timeout", type=float, default=3600, help="with --wait: give up waiting after this many seconds")
    r.add_argument("--json", action="store_true", help="print one JSON object with the job id (and final state)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, rest = _split(argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(ours)
    if args.backend == "slurm":
        bad = [a for a in unknown if not (a.startswith("--") and "=" in a and "." in a.split("=", 1)[0])]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)}")
        return submit_slurm(args, unknown + rest)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (the pico command goes after `--`)")
    return submit_ray(args, rest)


def submit_slurm(args: argparse.Namespace, overrides: list[str]) -> int:
    cfg = load_config(args.config, overrides)
    res = plan.resources_from(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                              ranks_per_node=args.ranks_per_node, cpus_per_task=args.cpus_per_task,
                              partition=args.partition, time=args.time, account=args.account, qos=args.qos,
                              mem=args.mem, signal_grace=args.signal_grace, max_requeues=args.max_requeues)
    if not args.dry_run:
        slurm.tool("sbatch")
    warnings = plan.check(cfg, res)
    available = slurm.partition_nodes(res.partition) if shutil.which("sinfo") else None
    if available is not None:
        try:
            plan.check_fits(res, available)
        except UserError as e:
            if not args.dry_run:
                raise
            warnings.append(f"{e} (this machine's Slurm; the dry run goes on)")
    plan.check_resume(cfg, res)
    # the cluster section records what was asked for, in the config the job trains from
    c = cfg.cluster
    c.nodes, c.gpus_per_node, c.cpus_per_task = res.nodes, res.gpus_per_node, res.cpus_per_task
    c.partition, c.time, c.account, c.qos, c.mem = res.partition, res.time, res.account, res.qos, res.mem

    workdir = Path.cwd()
    out_dir = (workdir / cfg.train.out_dir).resolve()
    name = args.name or (out_dir.name if out_dir.name.startswith("pico") else f"pico-{out_dir.name}")
    job = slurm.Job(name=name, config=out_dir / "slurm" / f"{name}.yaml", out_dir=out_dir, workdir=workdir)
    script = slurm.render(job, res)
    est = plan.estimate(cfg, res)
    for w in warnings:
        print(f"pico submit: warning: {w}", file=sys.stderr)

    if args.dry_run:
        if args.json:
            print(json.dumps({"script": script, "plan": est}))
        else:
            print(plan.describe(est, cfg.optim.name), file=sys.stderr)
            print(f"(dry run: would write {job.config} and {job.script}, then sbatch it)", file=sys.stderr)
            sys.stdout.write(script)
        return 0

    active = slurm.jobs_running_script(name, job.script)
    if active:
        raise UserError(f"job {', '.join(active)} ({name}) is already queued or running for {out_dir}; "
                        f"cancel it (pico jobs cancel {active[0]}) or pick another --train.out_dir")
    job.log_dir.mkdir(parents=True, exist_ok=True)  # Slurm opens --output before the script runs
    _write(job.config, cfg.to_yaml())
    _write(job.script, script)
    job_id = slurm.submit(job.script)
    if args.json:
        print(json.dumps({"job_id": job_id, "script": str(job.script), "log": str(job.log_dir / f"{name}-{job_id}.out"),
                          "plan": est}))
    else:
        print(plan.describe(est, cfg.optim.name), file=sys.stderr)
        print(f"submitted {job.script}; log: {job.log_dir / f'{name}-{job_id}.out'}; "
              f"follow with `pico jobs status {job_id}` and `pico jobs logs {job_id}`", file=sys.stderr)
        print(job_id)
    return 0


def submit_ray(args: argparse.Namespace, command: list[str]) -> int:
    env = {}
    for item in args.env:
        if "=" not in item:
            raise UserError(f"--env {item!r} must look like KEY=VALUE")
        k, v = item.split("=", 1)
        env[k] = v
    job_id = ray_jobs.submit(args.address, command, working_dir=args.working_dir, env=env,
                             submission_id=args.submission_id, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                             excludes=args.exclude)
    if not args.wait:
        print(json.dumps({"job_id": job_id}) if args.json else job_id)
        if not args.json:
            print(f"follow with `pico jobs status {job_id} --address ...` and `pico jobs logs {job_id} --address ...`",
                  file=sys.stderr)
        return 0
    state = ray_jobs.wait(args.address, job_id, args.timeout)
    sys.stderr.write(ray_jobs.logs(args.address, job_id))
    print(json.dumps({"job_id": job_id, "state": state}) if args.json else f"{job_id} {state}")
    return 0 if state == "SUCCEEDED" else 1


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


__all__ = ["main", "build_parser", "ConfigError"]
