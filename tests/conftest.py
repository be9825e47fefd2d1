"""Shared test setup: an offline, CPU-only, loopback-only environment, and real services.

Every test runs against real components (DeepSpeed on gloo, Ray, moto's S3 server, W&B in
offline mode). The environment below keeps all of them off the network.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_BASE_URL", "http://127.0.0.1:9")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")
os.environ.setdefault("WANDB_X_DISABLE_STATS", "true")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# DeepSpeed JIT-builds its CPU comm op once per environment: one folder per Python environment, so that two
# checkouts' suites running at once never rebuild over each other (a killed build leaves a lock that every
# later trainer waits on forever)
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "pico-torch-extensions" /
                                                  hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]))
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_CORPUS = REPO.parent / "shared" / "corpus"


@pytest.fixture(scope="session")
def corpus() -> Path:
    """The team's read-only sample corpus (tests and benchmarks only; never at run time)."""
    if not SHARED_CORPUS.exists():
        pytest.skip(f"{SHARED_CORPUS} not present")
    return SHARED_CORPUS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's server) on loopback; yields its endpoint URL and sets AWS_* env."""
    from moto.server import ThreadedMotoServer

    p = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=p, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{p}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    try:
        yield url
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (started here, stopped here; nothing else is touched)."""
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200_000_000,
                 log_to_driver=False, configure_logging=False)
        started = True
    yield ray
    if started:
        ray.shutdown()
