"""Real services for the cluster tests: a private single-node Slurm and a local Ray head.

Both are started here from the project's own scripts and stopped here by the PIDs they
started, never by name: other engineers' tests may run a Ray or a Slurm on the same machine.
"""

from __future__ import annotations

import io
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib import resources
from pathlib import Path

import pytest

from tests.conftest import free_port

SLURM_SCRIPTS = resources.files("pico.cluster").joinpath("slurm")
SLURM_PACKAGES = ("munge", "slurmctld", "slurmd", "slurm-client")


def _slurm_missing() -> list[str]:
    return [p for p in SLURM_PACKAGES
            if subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True)
            .stdout.find("ok installed") < 0] if shutil.which("dpkg-query") else list(SLURM_PACKAGES)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A one-node Slurm (2 CPUs here) with its own slurm.conf; yields the environment to reach it."""
    if os.geteuid() != 0:
        pytest.skip("the Slurm test cluster needs root (slurmd runs jobs as their users)")
    missing = _slurm_missing()
    if missing and not shutil.which("apt-get"):
        pytest.skip(f"Debian packages {', '.join(missing)} are missing and there is no apt-get to install them")
    base = tempfile.mkdtemp(prefix="pico-slurm-")
    env = dict(os.environ, PICO_SLURM_BASE=base, PICO_SLURM_CTLD_PORT=str(free_port()),
               PICO_SLURM_SLURMD_PORT=str(free_port()), PICO_SLURM_INSTALL="1")
    start = subprocess.run(["bash", str(SLURM_SCRIPTS / "start_slurm.sh")], env=env, capture_output=True,
                           text=True, timeout=600)
    if start.returncode != 0:
        subprocess.run(["bash", str(SLURM_SCRIPTS / "stop_slurm.sh")], env=env, capture_output=True, timeout=120)
        pytest.fail(f"start_slurm.sh failed:\n{start.stdout}\n{start.stderr}")
    conf = start.stdout.strip().splitlines()[-1].split("=", 1)[1]
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    try:
        yield {"SLURM_CONF": conf, "base": base}
    finally:
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        subprocess.run(["bash", str(SLURM_SCRIPTS / "stop_slurm.sh")], env=env, capture_output=True, timeout=120)


def job_fields(job_id: str) -> dict[str, str]:
    from pico.cluster import slurm

    return slurm.show_job(job_id) or {}


def wait_job(job_id: str, until, timeout: float = 120, poll: float = 0.5) -> dict[str, str]:
    """Poll `scontrol show job` until `until(fields)` holds; fail with the job's log if it never does."""
    end = time.monotonic() + timeout
    fields: dict[str, str] = {}
    while time.monotonic() < end:
        fields = job_fields(job_id)
        if fields and until(fields):
            return fields
        time.sleep(poll)
    log = fields.get("StdOut", "")
    text = Path(log).read_text(errors="replace")[-4000:] if log and Path(log).exists() else "(no log)"
    pytest.fail(f"job {job_id} did not reach the expected state in {timeout}s: {fields}\n{text}\n{daemon_logs()}")


def daemon_logs(lines: int = 25) -> str:
    """The end of slurmctld's and slurmd's logs, for failure messages."""
    conf = os.environ.get("SLURM_CONF", "")
    logs = Path(conf).parent.parent / "log" if conf else None
    if logs is None or not logs.is_dir():
        return "(no daemon logs)"
    return "\n".join(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-lines:])
                     for f in sorted(logs.glob("*.log")))


def write_shards(root: Path, docs: int = 24, seed: int = 0) -> Path:
    """A few tiny shards in pico's format ({split}-NNNNNN.tar of {key}.bin.zst + {key}.json)."""
    import zstandard

    rng = random.Random(seed)
    words = "a byte level model routes some positions into wider latent blocks and predicts the next bytes".split()
    zc = zstandard.ZstdCompressor()
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", docs), ("val", max(2, docs // 6))):
        with tarfile.open(root / f"{split}-000000.tar", "w") as tar:
            for i in range(n):
                doc = " ".join(rng.choice(words) for _ in range(120)).encode()
                for name, data in ((f"{split}{i:05d}.bin.zst", zc.compress(doc)),
                                   (f"{split}{i:05d}.json", json.dumps({"bytes": len(doc)}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root


# ---------------------------------------------------------------------------------------------
# Ray


def _ray_processes(marker: str):
    """Processes of the head started with PICO_TEST_RAY_HEAD=marker in their environment.

    The environment is inherited by every process Ray starts, including the agents and
    workers whose command line Ray rewrites (ray::DashboardAgent), so it finds them all.
    """
    import psutil

    # read /proc directly: Ray rewrites process titles over the start of the environment block,
    # which psutil.Process.environ() then misparses
    want = f"PICO_TEST_RAY_HEAD={marker}".encode()
    found = []
    for pid in psutil.pids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if pid != os.getpid() and want in f.read().split(b"\0"):
                    found.append(psutil.Process(pid))
        except (OSError, psutil.NoSuchProcess):
            continue
    return found


def _stop(procs, grace: float = 5.0) -> None:
    """TERM, then KILL what is still running after `grace` s (a zombie counts as stopped)."""
    import psutil

    def running(p) -> bool:
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    end = time.monotonic() + grace
    while time.monotonic() < end and any(running(p) for p in procs):
        time.sleep(0.2)
    for p in procs:
        if running(p):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.fixture(scope="session")
def ray_head():
    """`ray start --head` on loopback with its dashboard and token auth, in a temp dir of its own.

    Yields the dashboard URL and the token file.

    Teardown stops exactly the processes that carry this head's marker in their environment
    (plain `ray stop` would stop every Ray on the machine).
    """
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():
        pytest.skip(f"{ray_bin} not found (pip install 'ray[default]')")
    temp = tempfile.mkdtemp(prefix="pico-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    port, dash = free_port(), free_port()
    # token authentication on, with a token of this cluster's own (what Ray >= 2.59 does by default)
    token = Path(temp) / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = dict(os.environ, PATH=f"{ray_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}",
               RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
               PICO_TEST_RAY_HEAD=temp)
    started = subprocess.run(
        [str(ray_bin), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=1",
         "--object-store-memory=100000000", f"--temp-dir={temp}", "--disable-usage-stats",
         # every fixed default port moved, so a Ray someone else runs here does not collide
         *(f"--{flag}={free_port()}" for flag in ("ray-client-server-port", "dashboard-agent-listen-port",
                                                   "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                                   "metrics-export-port", "node-manager-port",
                                                   "object-manager-port"))],
        env=env, capture_output=True, text=True, timeout=180)
    try:
        if started.returncode != 0:
            pytest.fail(f"ray start failed:\n{started.stdout}\n{started.stderr}")
        yield {"address": f"http://127.0.0.1:{dash}", "token_path": str(token)}
    finally:
        for _ in range(2):  # a second pass catches anything started while the first one stopped
            _stop(_ray_processes(temp))
        shutil.rmtree(temp, ignore_errors=True)
