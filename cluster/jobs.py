"""`pico jobs status|logs|cancel JOB`: follow jobs that `pico submit` started.

A numeric JOB (1234) is a Slurm job; anything else (raysubmit_...), or any JOB given with
--address, is a Ray Job on the cluster at that dashboard address (default: $RAY_ADDRESS).
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from pico.cluster import ray_jobs, slurm
from pico.configs.errors import UserError

_SLURM_ID = re.compile(r"^\d+(_\d+)?$")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pico jobs", description=__doc__.strip().split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", required=True, metavar="status|logs|cancel")
    for verb, text in (("status", "state of a job (Slurm: also restarts and exit code)"),
                       ("logs", "print a job's output"), ("cancel", "cancel a Slurm job or stop a Ray job")):
        s = sub.add_parser(verb, help=text, description=text)
        s.add_argument("job", help="Slurm job id (1234) or Ray submission id (raysubmit_...)")
        s.add_argument("--address", help="Ray dashboard http://HOST:8265 (makes JOB a Ray job)")
        if verb == "status":
            s.add_argument("--json", action="store_true", help="print one JSON object")
        if verb == "logs":
            s.add_argument("--tail", type=int, default=0, help="only the last N lines")
    return p


def _is_slurm(args: argparse.Namespace) -> bool:
    return not args.address and bool(_SLURM_ID.match(args.job))


def slurm_status(job_id: str) -> dict:
    """State, exit code and restarts from scontrol (sacct once Slurm has forgotten the job)."""
    fields = slurm.show_job(job_id) or slurm.accounting(job_id)
    if fields is None:
        raise UserError(f"Slurm knows no job {job_id} (finished jobs are forgotten after MinJobAge unless "
                        "accounting is enabled); its log is under <train.out_dir>/slurm/")
    log = slurm.stdout_path(fields)
    return {"job_id": job_id, "backend": "slurm", "state": fields.get("JobState", "UNKNOWN"),
            "reason": fields.get("Reason"), "exit_code": fields.get("ExitCode"),
            "restarts": int(fields["Restarts"]) if fields.get("Restarts", "").isdigit() else None,
            "run_time": fields.get("RunTime"), "nodes": fields.get("NodeList"), "log": str(log) if log else None}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    is_slurm = _is_slurm(args)
    if args.verb == "status":
        info = slurm_status(args.job) if is_slurm else ray_jobs.status(args.address, args.job)
        if args.json:
            print(json.dumps(info))
        else:
            print(" ".join(f"{k}={v}" for k, v in info.items() if v not in (None, "")))
        return 0
    if args.verb == "logs":
        if is_slurm:
            info = slurm_status(args.job)
            if not info["log"]:
                raise UserError(f"Slurm does not say where job {args.job} writes its output")
            try:
                with open(info["log"], errors="replace") as f:
                    text = f.read()
            except FileNotFoundError:
                raise UserError(f"{info['log']} does not exist yet (job {args.job} is {info['state']})") from None
        else:
            text = ray_jobs.logs(args.address, args.job)
        if args.tail:
            text = "".join(text.splitlines(keepends=True)[-args.tail:])
        sys.stdout.write(text)
        return 0
    if is_slurm:
        slurm.cancel(args.job)
        print(f"cancelled Slurm job {args.job}", file=sys.stderr)
    else:
        stopped = ray_jobs.stop(args.address, args.job)
        print(f"{'stopped' if stopped else 'already finished:'} Ray job {args.job}", file=sys.stderr)
    return 0
