"""Slurm: render the sbatch script of a training run, submit it, and ask Slurm about jobs.

The script follows the usual shape of multi-node PyTorch jobs: sbatch holds the allocation,
`srun` starts one `torchrun` per node, torchrun starts one `pico train` per GPU (or per CPU
rank), and the rendezvous address is the allocation's first node. Everything Slurm-specific
that the trainer needs (rank, world size, master address) arrives through torchrun's
environment, so `pico train` itself knows nothing of Slurm.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pico.cluster.plan import Resources
from pico.configs.errors import UserError

SLURM_CLIENT_HINT = ("the Slurm client tools (Debian/Ubuntu package slurm-client: apt-get install slurm-client; "
                     "on a cluster, run on a login node or `module load slurm`)")


def tool(name: str) -> str:
    """Path of a Slurm command, or a UserError that says which package provides it."""
    path = shutil.which(name)
    if path is None:
        raise UserError(f"`{name}` is not on PATH: pico submit slurm needs {SLURM_CLIENT_HINT}")
    return path


def run_tool(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run a Slurm command; a non-zero exit becomes a UserError carrying Slurm's own message."""
    exe = tool(argv[0])
    try:
        out = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UserError(f"`{' '.join(argv)}` did not answer in {timeout:.0f}s: is slurmctld reachable?") from None
    if out.returncode != 0:
        msg = (out.stderr or out.stdout).strip()
        raise UserError(f"`{shlex.join(argv)}` failed (exit {out.returncode}): {msg}")
    return out


@dataclass
class Job:
    """What `render` needs besides the resources: where things are and what to call it."""

    name: str
    config: Path
    """The resolved config the job trains from (written at submission)."""
    out_dir: Path
    workdir: Path
    python: str = sys.executable

    @property
    def log_dir(self) -> Path:
        return self.out_dir / "slurm"

    @property
    def script(self) -> Path:
        return self.log_dir / f"{self.name}.sbatch"


# A Slurm job name, partition list, account, qos, memory or time: what goes into an #SBATCH line unquoted by
# sbatch's own reader. A newline there would end the header (sbatch stops at the first non-#SBATCH line)
# and run the rest as a command.
_SLURM_WORD = re.compile(r"^[A-Za-z0-9._,:+@-]+$")
_SHOW_KEY = re.compile(r"^([A-Z][A-Za-z0-9_:/]*)=")  # a key of `scontrol show job`


def check_script_values(name: str, res: Resources, paths: dict[str, object]) -> None:
    """Refuse a value that would change what the batch script says: a name or Slurm option outside
    `_SLURM_WORD`, a path with a control character (a line break ends a comment or a header line) or a
    `%` (Slurm expands it in --output and --chdir)."""
    for key, value in (("job name (--name, by default from train.out_dir)", name),
                       ("--partition (cluster.partition)", res.partition), ("--account (cluster.account)", res.account),
                       ("--qos (cluster.qos)", res.qos), ("--mem (cluster.mem)", res.mem),
                       ("--time (cluster.time)", res.time)):
        if value and not _SLURM_WORD.match(str(value)):
            raise UserError(f"{key}={str(value)[:80]!r}: Slurm names, memory and times hold only letters, digits and "
                            "._,:+@-; choose one without spaces, slashes or line breaks")
    for key, value in paths.items():
        text = str(value)
        if "%" in text or any(ord(c) < 32 or ord(c) == 127 for c in text):
            raise UserError(f"{key} {text[:120]!r} holds a control character or a %, which the batch script or "
                            "Slurm's file patterns would read as something else; choose a plain path")


def sbatch_lines(job: Job, res: Resources, output: str = "%x-%j.out") -> list[str]:
    """The #SBATCH header: one launcher task per node, GPUs per node, requeue and warning signal."""
    opts = [f"--job-name={job.name}", f"--nodes={res.nodes}", "--ntasks-per-node=1",
            f"--cpus-per-task={res.cpus_per_task}"]
    if res.gpus_per_node:
        opts.append(f"--gpus-per-node={res.gpus_per_node}")
    opts += [f"--mem={res.mem}", f"--time={res.time}"]
    opts += [f"--{k}={v}" for k, v in (("partition", res.partition), ("account", res.account), ("qos", res.qos)) if v]
    opts += [f"--chdir={job.workdir}", f"--output={job.log_dir}/{output}", "--open-mode=append",
             "--requeue", f"--signal=B:USR1@{res.signal_grace}"]
    return [f"#SBATCH {shlex.quote(o)}" for o in opts]


def env_lines(res: Resources) -> list[str]:
    """Backend settings: NCCL on GPUs, gloo and DeepSpeed's CPU accelerator on CPU ranks."""
    threads = max(1, res.cpus_per_task // res.ranks_per_node)
    if res.gpus_per_node == 0:
        return ["# CPU ranks: DeepSpeed's CPU accelerator, gloo collectives, the cores split between ranks",
                "export DS_ACCELERATOR=cpu", f"export OMP_NUM_THREADS={threads}"]
    return ["# GPU ranks: NCCL. Fabric settings (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...) are site-specific: add them here",
            "export DS_ACCELERATOR=cuda", f"export OMP_NUM_THREADS={threads}",
            "export NCCL_DEBUG=${NCCL_DEBUG:-WARN}",
            "export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a failed collective ends the job instead of hanging it"]


def render(job: Job, res: Resources) -> str:
    """The complete sbatch script."""
    check_script_values(job.name, res, {"train.out_dir": job.out_dir, "the working directory": job.workdir,
                                        "the config": job.config, "python": job.python})
    template = resources.files("pico.cluster").joinpath("templates/train.sbatch").read_text()
    values = {
        "script": shlex.quote(str(job.script)), "sbatch": "\n".join(sbatch_lines(job, res)),
        "env": "\n".join(env_lines(res)), "workdir": shlex.quote(str(job.workdir)),
        "cpus": str(res.cpus_per_task), "ranks": str(res.ranks_per_node),
        # leave the ranks the whole warning period minus a margin for the requeue itself
        "shutdown": str(max(5, res.signal_grace - 30)), "grace": str(res.signal_grace),
        "python": shlex.quote(job.python), "config": shlex.quote(str(job.config)),
        "max_requeues": str(res.max_requeues),
    }
    text = re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], template)
    return text if text.endswith("\n") else text + "\n"


@dataclass
class ArrayJob:
    """A Slurm array of one-process tasks (`pico experiment`: one task per run)."""

    name: str
    tasks: Path
    """One line per task; task i runs `command` with the line's text as its last argument."""
    n_tasks: int
    command: list[str]
    """What a task runs, before its line (python -m pico.pipeline.cli experiment run-one DESIGN --run)."""
    log_dir: Path
    workdir: Path
    max_parallel: int = 0

    @property
    def script(self) -> Path:
        return self.log_dir / f"{self.name}.sbatch"


def render_array(job: ArrayJob, res: Resources) -> str:
    """The sbatch script of an array job: task i runs line i of the tasks file; a warned task requeues itself."""
    check_script_values(job.name, res, {"the log directory": job.log_dir, "the working directory": job.workdir,
                                        "the tasks file": job.tasks,
                                        **{f"command word {i}": w for i, w in enumerate(job.command)}})
    template = resources.files("pico.cluster").joinpath("templates/array.sbatch").read_text()
    throttle = f"%{job.max_parallel}" if job.max_parallel else ""
    header = sbatch_lines(Job(name=job.name, config=job.tasks, out_dir=job.log_dir.parent, workdir=job.workdir), res,
                          output="%x-%A_%a.out")
    header = [line.replace(f"{job.log_dir.parent}/slurm/", f"{job.log_dir}/") for line in header]
    header.append(f"#SBATCH --array=0-{job.n_tasks - 1}{throttle}")
    values = {"script": shlex.quote(str(job.script)), "sbatch": "\n".join(header), "env": "\n".join(env_lines(res)),
              "workdir": shlex.quote(str(job.workdir)), "tasks": shlex.quote(str(job.tasks)),
              "command": shlex.join(job.command), "max_requeues": str(res.max_requeues)}
    text = re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], template)
    return text if text.endswith("\n") else text + "\n"


def array_tasks_active(job_id: str) -> set[int] | None:
    """Task indices of an array job still queued or running; None when Slurm no longer knows the job."""
    out = subprocess.run([tool("squeue"), "-h", "-r", "-j", job_id, "-o", "%i|%T"], capture_output=True, text=True,
                         timeout=30)
    if out.returncode != 0:
        if "invalid job id" in out.stderr.lower():
            return None
        raise UserError(f"`squeue -j {job_id}` failed: {out.stderr.strip()} (is SLURM_CONF right?)")
    active = set()
    for line in out.stdout.splitlines():
        jid, _, state = line.strip().partition("|")
        if "_" in jid and state != "COMPLETING" and jid.split("_", 1)[1].isdigit():
            active.add(int(jid.split("_", 1)[1]))
    return active


def submit(script: Path) -> str:
    """sbatch the script; returns the job id."""
    out = run_tool("sbatch", "--parsable", str(script), timeout=60)
    return out.stdout.strip().split(";")[0]


def jobs_running_script(name: str, script: Path) -> list[str]:
    """Jobs of this name that run (or wait to run) `script`; a job that is only completing does not count."""
    out = run_tool("squeue", "-h", "-n", name, "-o", "%i|%T|%o")
    found = []
    for line in out.stdout.splitlines():
        parts = line.strip().split("|", 2)
        if len(parts) == 3 and parts[1] != "COMPLETING" and parts[2] == str(script):
            found.append(parts[0])
    return found


def partition_nodes(partition: str) -> list[dict[str, int]] | None:
    """CPUs, memory (MB) and GPUs of each node in the partition, from sinfo; None if sinfo cannot say."""
    argv = ["sinfo", "-h", "-N", "-o", "%N|%c|%m|%G"]
    if partition:
        argv += ["-p", partition]
    try:
        out = run_tool(*argv)
    except UserError:
        return None
    nodes: dict[str, dict[str, int]] = {}
    for line in out.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 4:
            continue
        name, cpus, mem, gres = parts
        gpus = sum(int(m.group(1)) for m in re.finditer(r"gpu(?::[^:,(]+)?:(\d+)", gres))
        try:
            nodes[name] = {"cpus": int(cpus.rstrip("+")), "mem_mb": int(mem.rstrip("+")), "gpus": gpus}
        except ValueError:
            continue
    return list(nodes.values())


def show_job(job_id: str) -> dict[str, str] | None:
    """`scontrol show job` as a dict (Slurm keeps finished jobs for MinJobAge); None if unknown."""
    exe = tool("scontrol")
    out = subprocess.run([exe, "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    if out.returncode != 0 and "invalid job id" not in out.stderr.lower():
        raise UserError(f"`scontrol show job {job_id}` failed: {out.stderr.strip()} (is this a Slurm login node, "
                        "and is SLURM_CONF right?)")
    if out.returncode != 0 or not out.stdout.strip():
        return None
    return parse_show_job(out.stdout.strip().splitlines()[0])


def parse_show_job(line: str) -> dict[str, str]:
    """One line of `scontrol show job -o`: Key=Value pairs separated by spaces, where a value (StdOut=, a path
    with a space in it) may hold spaces: a word that does not start a Key= continues the value before it."""
    fields: dict[str, str] = {}
    key = None
    for word in line.split(" "):
        m = _SHOW_KEY.match(word)
        if m:
            key = m.group(1)
            if key in fields:  # a repeated key (Slurm prints some twice): the first stands
                key = None
                continue
            fields[key] = word[m.end():]
        elif key is not None:
            fields[key] += " " + word
    return fields


def accounting(job_id: str) -> dict[str, str] | None:
    """sacct's record of a job that scontrol has forgotten; None without accounting."""
    if shutil.which("sacct") is None:
        return None
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,JobName,State,ExitCode,Elapsed"],
                         capture_output=True, text=True, timeout=30)
    line = out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else ""
    if not line:
        return None
    jid, name, state, code, elapsed = (line.split("|") + [""] * 5)[:5]
    return {"JobId": jid, "JobName": name, "JobState": state, "ExitCode": code, "RunTime": elapsed}


def stdout_path(fields: dict[str, str]) -> Path | None:
    """The job's output file, with the filename patterns Slurm may leave unexpanded."""
    path = fields.get("StdOut")
    if not path:
        return None
    subst = {"%j": fields.get("JobId", ""), "%A": fields.get("ArrayJobId", fields.get("JobId", "")),
             "%a": fields.get("ArrayTaskId", ""), "%x": fields.get("JobName", ""), "%u": os.environ.get("USER", "")}
    for k, v in subst.items():
        path = path.replace(k, v)
    return Path(path)


def cancel(job_id: str) -> None:
    run_tool("scancel", job_id)
