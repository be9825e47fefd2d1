"""Credentials reach Ray workers without Ray writing them anywhere (issue 19, serious item 1)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from pico.data_prep.job import _Task

pytestmark = pytest.mark.ray


def files_containing(root: Path, needle: bytes) -> list[str]:
    """Every regular file under root whose bytes contain needle (sockets and the like are skipped)."""
    hits = []
    for d, _, names in os.walk(root):
        for n in names:
            p = Path(d) / n
            try:
                if p.is_file() and not p.is_symlink() and needle in p.read_bytes():
                    hits.append(str(p.relative_to(root)))
            except OSError:
                continue
    return hits


def test_aws_settings_reach_tasks_of_an_already_running_ray_and_do_not_stay(ray_local, monkeypatch):
    # set after this Ray's workers were started, so only the task argument can carry it
    monkeypatch.setenv("AWS_PICO_PROBE", "probe-value")
    task = _Task(ray_local, os.getenv)
    assert ray_local.get(task.remote("AWS_PICO_PROBE")) == "probe-value"
    monkeypatch.delenv("AWS_PICO_PROBE")
    plain = ray_local.remote(num_cpus=1)(os.getenv)
    assert all(v is None for v in ray_local.get([plain.remote("AWS_PICO_PROBE") for _ in range(4)]))


DRIVER = textwrap.dedent("""
    import os, sys, ray
    from pico.data_prep import prepare
    ray.init(num_cpus=1, include_dashboard=False, _temp_dir=sys.argv[1], object_store_memory=100_000_000)
    prepare([sys.argv[2]], sys.argv[3], progress=False, shard_bytes=4096)
    # control: a value sent the way prep used to send credentials lands in Ray's logs
    print(ray.get(ray.remote(os.getenv).options(runtime_env={"env_vars": {"PICO_CONTROL": sys.argv[4]}})
                  .remote("PICO_CONTROL")))
    ray.shutdown()
""")


@pytest.mark.s3
@pytest.mark.slow
def test_no_credential_in_any_file_ray_or_pico_wrote(s3_server, tmp_path):
    import s3fs

    secret, token, control = "pico-fake-secret-7f3a9c", "pico-fake-token-51e0bd", "pico-control-2c8e44"
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        (src / f"doc{i}.txt").write_bytes(f"document {i} ".encode() * 200)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    if not fs.exists("pico-cred"):
        fs.mkdir("pico-cred")
    ray_dir = Path(tempfile.mkdtemp(prefix="pr", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(AWS_SECRET_ACCESS_KEY=secret, AWS_SESSION_TOKEN=token, AWS_ACCESS_KEY_ID="pico-fake-id")
    try:
        r = subprocess.run([sys.executable, "-c", DRIVER, str(ray_dir), str(src), "s3://pico-cred/out", control],
                           capture_output=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr.decode()[-3000:]
        assert control.encode() in r.stdout
        assert files_containing(ray_dir, control.encode()), "the control value should be in Ray's logs"
        for value in (secret, token):
            assert files_containing(ray_dir, value.encode()) == []
            assert value.encode() not in r.stdout + r.stderr
        fs.invalidate_cache()
        written = fs.find("pico-cred/out")
        assert any(p.endswith("manifest.json") for p in written)
        for p in written:
            data = fs.cat_file(p)
            assert secret.encode() not in data and token.encode() not in data, p
    finally:
        import shutil

        shutil.rmtree(ray_dir, ignore_errors=True)
