"""Loading a release: the only code that reads what `pico convert` wrote, and `load_model`.

`load_release(dir)` reads JSON and safetensors only (nothing is unpickled), checks every
checksum first, refuses a newer format version, rebuilds the network with
`pico.model.build_model` and loads the weights strictly. `load_model(path)` takes either a
release or a training checkpoint, so eval, generate and the quickstart need not care which.

The format's file names and version live here; `convert.py` writes them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pico.configs.errors import UserError
from pico.configs.files import SUMS, read_sums, sha256_file, small_text
from pico.configs.runs import STATE_FILE, read_run_state
from pico.model.config import n_routed
from pico.model.flops import param_count

if TYPE_CHECKING:
    import torch

FORMAT = "pico-release"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
DTYPES = {"fp32": "F32", "bf16": "BF16"}


def parse_model_config(data: dict[str, Any], where: Path):
    """The ModelConfig recorded in a release or checkpoint; `where` names the file in the error."""
    from pico.configs.tree import ConfigError, from_dict
    from pico.model.config import ModelConfig

    try:
        model_cfg = check_model_config(from_dict(ModelConfig, data, "model"))
    except (ConfigError, ValueError, TypeError) as e:
        raise UserError(f"{where}: the model config cannot be rebuilt by this pico ({e})") from None
    check_fits_in_memory(model_cfg, where)
    return model_cfg


# What a model config makes its loader allocate, in bytes (fp32), before it is built: its
# parameters (and ~64 KB of module overhead per block), and for one sequence of max_seq_len bytes
# the residual stream and one layer's output, and one layer's attention scores (dense up to the
# window, as the CPU path computes them; the latent blocks' dense and unwindowed over the routed
# positions, at the most the router can route).
_BLOCK_BYTES = 64 << 10
_NEEDS = {"its parameters": lambda c: 4 * param_count(c) + _BLOCK_BYTES * (c.n_in + c.n_out + c.n_latent),
          "one sequence's activations": lambda c: 8 * c.max_seq_len * max(c.d_local, c.d_latent),
          "one sequence's attention scores": lambda c: 4 * c.n_heads * c.max_seq_len * min(c.max_seq_len, 2 * c.window),
          "one sequence's latent attention scores": lambda c: 4 * c.n_latent_heads * _latent_slots(c) ** 2}
_SIZE_KEYS = ("max_seq_len", "d_local", "d_latent", "n_in", "n_out", "n_latent", "n_predict", "mlp_ratio",
              "mtp_mlp_ratio", "ngram_buckets", "n_heads", "n_kv_heads", "n_latent_heads", "n_latent_kv_heads",
              "window", "capacity", "chunk_cap")


def _latent_slots(c) -> int:
    """The most positions one sequence routes to the latent blocks (0 without a router)."""
    if not c.n_latent:
        return 0
    from pico.model.flops import _router

    rc = _router(c)
    return n_routed((rc.max_rate(c) if rc is not None else None) or c.capacity, c.max_seq_len)


def check_fits_in_memory(model_cfg, where: Path) -> None:
    """Refuse a release or checkpoint config whose sizes cannot fit in this machine's memory, before
    anything is allocated (issue 28: a hostile config.json took all memory in build_model). The error
    names the key that, put back to its default, shrinks the estimate most."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for what, need in _NEEDS.items():
        n = need(model_cfg)
        if n > ram:
            key = _culprit(model_cfg, need)
            raise UserError(f"{where}: model.{key}={getattr(model_cfg, key)} makes {what} take ~{n / 2**30:,.0f} GiB "
                            f"(fp32), more than this machine's {ram / 2**30:,.0f} GiB of memory; nothing was "
                            "allocated. The config is damaged or not meant for this machine")


def _culprit(model_cfg, need) -> str:
    """The size key whose default value gives the smallest estimate."""
    import dataclasses

    defaults = type(model_cfg)()
    smallest = {}
    for key in _SIZE_KEYS:
        try:
            smallest[key] = need(dataclasses.replace(model_cfg, **{key: getattr(defaults, key)}))
        except (ValueError, TypeError, ZeroDivisionError):  # that value alone breaks a rule between keys
            continue
    return min(smallest, key=smallest.get, default="max_seq_len")


def check_model_config(model_cfg):
    """model_cfg, once its router exists and takes every router option it sets (model/routers/base.py);
    a ConfigError naming the key otherwise. ModelConfig itself cannot check this: it is torch-free."""
    from pico.configs.tree import ConfigError
    from pico.model.routers.base import validate_config

    try:
        validate_config(model_cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return model_cfg


def build_network(model_cfg):
    """build_model without touching the caller's RNG (initial weights are overwritten anyway)."""
    import torch

    from pico.model import build_model

    with torch.random.fork_rng(devices=[]):
        return build_model(model_cfg)


def pico_version() -> str:
    """The installed pico's version, recorded in and checked against a release."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pico")
    except PackageNotFoundError:
        return "unknown"




def read_checksums(release: Path) -> dict[str, str]:
    """{file name: sha256} from a release's SHA256SUMS."""
    f = Path(release) / SUMS
    if not f.exists() and not f.is_symlink():
        raise UserError(f"{release} has no {SUMS}; it is not a complete pico release (convert it again)")
    sums = read_sums(f, MAX_SMALL_FILE, "the release is corrupt (convert it again)")
    for need in (WEIGHTS, CONFIG):
        if need not in sums:
            raise UserError(f"{f} does not list {need}; the release is incomplete (convert it again)")
    return sums


def checksum_errors(release: Path, sums: dict[str, str]) -> list[str]:
    errors = []
    for name, digest in sums.items():
        p = release / name
        if not p.is_file():  # a FIFO or a device would hang or never end the hash
            errors.append(f"{name} is missing or not a regular file")
        elif sha256_file(p) != digest:
            errors.append(f"{name} has sha256 {sha256_file(p)[:12]}..., {SUMS} says {digest[:12]}...")
    return errors


def load_release(path: str | os.PathLike, dtype=None) -> tuple[Any, dict[str, Any]]:
    """The model of a release directory (eval mode, on CPU) and what the release records.

    Reads JSON and safetensors only: nothing is unpickled. Checksums are verified before the
    weights are parsed. bf16 weights are cast to `dtype` (default float32, what CPUs compute in)."""
    import torch

    release = Path(path)
    if not release.is_dir():
        raise UserError(f"release {release} is not a directory; pass the directory written by `pico convert`")
    config = read_release_config(release)
    errors = checksum_errors(release, read_checksums(release))
    if errors:
        raise UserError(f"release {release} is corrupt: {'; '.join(errors)}. Copy it again or rerun `pico convert`")
    model_cfg = parse_model_config(config.get("model", {}), release / CONFIG)
    from pico.model.pico import upgrade_state_dict

    state, meta = _read_weights(release / WEIGHTS, config)
    state = upgrade_state_dict(state)  # names of an older pico's release
    model = build_network(model_cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(f"{release / WEIGHTS} does not match {CONFIG}: missing {missing[:5]}, unexpected "
                        f"{unexpected[:5]}")
    target = dtype or torch.float32
    try:
        model.load_state_dict({k: v.to(target) for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        raise UserError(f"{release / WEIGHTS} does not match {CONFIG}: {e}") from None
    model.to(target).eval()
    try:
        training = json.loads(meta.get("pico_training", "{}"))
    except ValueError:
        training = {}
    info = {"path": str(release), "format_version": config["format_version"], "pico_version": config.get("pico_version"),
            "dtype": config.get("dtype"), **training}
    return model, info


def read_release_config(release: Path) -> dict[str, Any]:
    """config.json of a release, after checking that this pico can read its format version."""
    f = Path(release) / CONFIG
    if not f.exists():
        raise UserError(f"{release} has no {CONFIG}; it is not a pico release (make one with `pico convert`)")
    try:
        config = json.loads(_small_text(f))
    except (ValueError, RecursionError) as e:
        raise UserError(f"{f} is not valid JSON ({str(e)[:200]}); the release is corrupt") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise UserError(f"{f} is not a pico release config (no \"format\": \"{FORMAT}\")")
    version = config.get("format_version")
    if not isinstance(version, int):
        raise UserError(f"{f}: format_version is {version!r}, expected an integer")
    if version > FORMAT_VERSION:
        raise UserError(f"{release} uses release format {version} (written by pico {config.get('pico_version')}); "
                        f"this pico ({pico_version()}) reads formats up to {FORMAT_VERSION}. Upgrade pico")
    return config


MAX_SMALL_FILE = 1 << 20  # config.json, SHA256SUMS: a few KB


def _small_text(f: Path) -> str:
    """A release's small text file (config.json), a regular file of at most MAX_SMALL_FILE bytes."""
    return small_text(f, MAX_SMALL_FILE, "the release is corrupt (convert it again)")


def _read_weights(f: Path, config: dict[str, Any]) -> tuple[dict, dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    if not f.exists():
        raise UserError(f"{f} is missing; the release is incomplete")
    dtype = config.get("dtype", "")
    want = DTYPES.get(dtype) if isinstance(dtype, str) else None
    try:
        with safe_open(str(f), framework="pt") as st:
            meta = st.metadata() or {}
            state = {k: st.get_tensor(k) for k in st.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{f} cannot be read as safetensors ({e}); the release is corrupt") from None
    import torch

    codes = {torch.float32: "F32", torch.bfloat16: "BF16"}
    odd = sorted(k for k, v in state.items() if codes.get(v.dtype) != want)
    if odd:
        raise UserError(f"{f}: tensors {odd[:5]} are not {config.get('dtype')} as {CONFIG} says")
    return state, meta


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", trust: bool = False):
    """A ready-to-run model (eval mode) from a release directory or a training checkpoint.

    Returns (model, info) where info holds the source kind and whatever the source recorded
    (steps, bytes seen, eval bpb). A checkpoint's pickles are held to an allowlist unless `trust`."""
    from pico.model import build_model
    from pico.pipeline.train.checkpoint import load_model_state, resolve_checkpoint

    p = Path(path)
    if not p.exists():
        raise UserError(f"model path {p} does not exist; pass a release directory (from `pico convert`) or a "
                        "checkpoint / run directory (from `pico train`)")
    if (p / "model.safetensors").exists() or (p / "config.json").exists():
        model, info = load_release(p)
        return model.to(device).eval(), {"kind": "release", **info}
    try:
        step = resolve_checkpoint(p)
    except UserError as e:
        raise UserError(f"{p} is neither a release (model.safetensors + config.json) nor a training checkpoint: {e}") from None
    # the config first: its sizes are checked before the weights are read or the model is built
    cfg = parse_model_config(read_run_state(step)["config"]["model"], step / STATE_FILE)
    sd, run_state = load_model_state(p, trust)  # its errors name the checkpoint and what is wrong with it
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint {p} does not match its own model config: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}")
    return model.to(device).eval(), {"kind": "checkpoint", "path": str(resolve_checkpoint(p)), **{
        k: run_state.get(k) for k in ("step", "bytes_seen", "eval", "zero_stage", "world_size")}}
