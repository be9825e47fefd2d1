"""Ray Jobs: run a `pico` command on a Ray cluster through its dashboard's job API.

The entrypoint is the `pico` command line itself (`pico prep ...`, `pico train ...`), started
by the cluster's job supervisor on the head node. `pico prep` running there connects to the
same cluster (Ray sets RAY_ADDRESS for job entrypoints; prep also gets `--ray-address auto`),
so its tasks spread over the cluster's workers.
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path
from typing import Any

from pico.configs.errors import UserError

RAY_HINT = "Ray's job client (pip install 'ray[default]==2.60.0'; plain `ray` lacks the job submission API)"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def client(address: str | None):
    """A JobSubmissionClient for the dashboard at `address` (http://HOST:8265), with errors that teach."""
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError:
        raise UserError(f"Ray is missing: pico submit ray needs {RAY_HINT}") from None
    address = address or os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address:
        raise UserError("no Ray address: pass --address http://HOST:8265 (the head's dashboard) or set RAY_ADDRESS")
    if "://" not in address:
        address = f"http://{address}"
    try:
        return JobSubmissionClient(address, headers=_auth_headers())
    except Exception as e:  # ray raises ConnectionError, ValueError, RuntimeError or AuthenticationError here
        raise UserError(f"cannot reach the Ray dashboard at {address}: {e}. Is the head running with its dashboard "
                        "(`ray start --head --dashboard-host 0.0.0.0`), on port 8265 (the default)? A cluster with "
                        "token authentication needs its token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
                        "~/.ray/auth_token (`ray get-auth-token`)") from None


def _auth_headers() -> dict[str, str]:
    """The cluster token as a bearer header, when there is one and RAY_AUTH_MODE does not decide.

    Ray >= 2.59 turns token authentication on by default for clusters started where a token
    exists, but its job client only sends the token when RAY_AUTH_MODE=token is set. Sending it
    whenever one is found lets `pico submit ray` reach both kinds of cluster.
    """
    if os.environ.get("RAY_AUTH_MODE"):
        return {}  # Ray's own client follows the explicit mode
    token = os.environ.get("RAY_AUTH_TOKEN", "")
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    if not token and os.path.isfile(path):
        token = Path(path).read_text().strip()
    return {"authorization": f"Bearer {token}"} if token else {}


def entrypoint(args: list[str]) -> str:
    """`pico ARGS`, shell-quoted; prep is told to join the cluster the job runs on."""
    if not args or args[0] not in ("prep", "train", "eval", "experiment"):
        raise UserError("pico submit ray needs a pico command after `--`, for example: "
                        "pico submit ray --address http://HEAD:8265 -- prep --input SRC --output DST")
    args = list(args)
    if args[0] == "prep" and not any(a == "--ray-address" or a.startswith("--ray-address=") for a in args):
        args.insert(1, "--ray-address=auto")
    return shlex.join(["pico", *args])


def runtime_env(working_dir: str | None, env: dict[str, str], excludes: list[str] | None = None) -> dict[str, Any]:
    """working_dir (uploaded by Ray; the entrypoint runs inside the copy) and environment variables.

    pico itself is not shipped: the cluster's Python must have it installed (the same version),
    as Ray's working_dir cannot carry an installed package with its namespace layout.
    """
    renv: dict[str, Any] = {"env_vars": {"PYTHONUNBUFFERED": "1", **env}}
    if working_dir:
        wd = Path(working_dir).resolve()
        if not wd.is_dir():
            raise UserError(f"--working-dir {working_dir}: no such directory")
        renv["working_dir"] = str(wd)
        # run directories, shards and environments do not belong in an upload (Ray caps it at 500 MiB)
        renv["excludes"] = [".git", ".venv", "runs", "*.tar", *(excludes or [])]
    return renv


def relative_paths(args: list[str]) -> list[str]:
    """Arguments naming an existing local path by a relative name (meaningless in the job's directory)."""
    found = []
    for a in args[1:]:
        value = a.split("=", 1)[1] if a.startswith("--") and "=" in a else a
        if value and not value.startswith("-") and not os.path.isabs(value) and "://" not in value \
                and os.path.exists(value):
            found.append(value)
    return found


def submit(address: str | None, args: list[str], working_dir: str | None = None,
           env: dict[str, str] | None = None, submission_id: str | None = None,
           num_cpus: float | None = None, num_gpus: float | None = None, excludes: list[str] | None = None) -> str:
    """Submit `pico ARGS` as a Ray Job; returns its submission id."""
    rel = relative_paths(args)
    if rel and not working_dir:
        raise UserError(f"relative path(s) {', '.join(rel)}: the job does not run in this directory. Pass "
                        "--working-dir . to upload it (outputs must then be absolute or s3:// paths), or use "
                        "absolute paths on a filesystem the cluster shares")
    c = client(address)
    try:
        return c.submit_job(entrypoint=entrypoint(args), runtime_env=runtime_env(working_dir, env or {}, excludes),
                            submission_id=submission_id, entrypoint_num_cpus=num_cpus,
                            entrypoint_num_gpus=num_gpus, metadata={"submitted_by": "pico submit ray"})
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"Ray refused the job: {e}") from None


def status(address: str | None, job_id: str) -> dict[str, Any]:
    c = client(address)
    try:
        info = c.get_job_info(job_id)
    except Exception as e:
        raise UserError(f"Ray job {job_id}: {e}") from None
    return {"job_id": job_id, "backend": "ray", "state": str(info.status.value if hasattr(info.status, "value")
                                                              else info.status),
            "entrypoint": info.entrypoint, "message": info.message}


def wait(address: str | None, job_id: str, timeout: float, poll: float = 1.0) -> str:
    """Poll until the job ends; returns its final state (or the current one on timeout)."""
    end = time.monotonic() + timeout
    while True:
        state = status(address, job_id)["state"]
        if state in TERMINAL or time.monotonic() > end:
            return state
        time.sleep(poll)


def _call(address: str | None, job_id: str, method: str):
    """client(address).<method>(job_id), with Ray's errors turned into a UserError naming the job."""
    try:
        return getattr(client(address), method)(job_id)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"Ray job {job_id}: {e}") from None


def logs(address: str | None, job_id: str) -> str:
    return _call(address, job_id, "get_job_logs")


def stop(address: str | None, job_id: str) -> bool:
    return _call(address, job_id, "stop_job")
