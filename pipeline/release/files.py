"""Writing a release's files: safetensors with a deterministic header, canonical JSON, the model card.

convert.py (pico's format) and hf.py (the Hugging Face directory) both write through here.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from pico.configs.files import SUMS
from pico.pipeline.release.load import CARD, CONFIG, FORMAT_VERSION, WEIGHTS


def canonical_json(obj: Any) -> str:
    """Compact JSON with sorted keys: the same object always gives the same bytes (release metadata)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


# ----------------------------------------------------------------------------- safetensors


def write_safetensors(path: Path, tensors: dict, metadata: dict[str, str]) -> None:
    """A safetensors file with a deterministic header (keys sorted), read by any safetensors reader.

    Layout (the format's spec): 8-byte little-endian header length, the JSON header padded with
    spaces to a multiple of 8, then the tensors' bytes back to back, little-endian, row-major."""
    import torch

    dtypes = {v.dtype for v in tensors.values()}
    dtype_codes = {"torch.float32": "F32", "torch.bfloat16": "BF16"}
    if len(dtypes) != 1 or str(next(iter(dtypes))) not in dtype_codes:
        raise ValueError(f"write_safetensors takes tensors of one dtype, fp32 or bf16; got {dtypes}")
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        n = t.numel() * t.element_size()
        header[name] = {"dtype": dtype_codes[str(t.dtype)], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in sorted(tensors):
            f.write(tensors[name].reshape(-1).view(torch.uint8).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- model card


def model_card(model_cfg, training: dict[str, Any], dtype: str, use: list[str] | None = None,
               files: str | None = None) -> str:
    """README.md of a release: deterministic text (no dates), so converting twice gives the same bytes.

    `use` and `files` replace the "Use" lines and the "Files" paragraph (the HF release has its own)."""
    c = model_cfg
    ev = training["eval"]
    fpb = training["flops_per_byte"]
    n_params = training["n_params"]
    from pico.model.routers.base import router_class

    rc = router_class(c)
    router = rc.describe(c) if rc is not None else "none: a plain byte-level Transformer"
    if c.dechunk:
        router += "; dechunked return path (H-Net)"
    lines = [
        f"# Pico release ({training['checkpoint']})", "",
        "Pico is a byte-level language model (no tokenizer: the vocabulary is the 256 byte values plus "
        "BOS, EOS and PAD). Local Transformer blocks see every byte; a router sends a fraction of the "
        "positions through wider latent blocks; multi-token-prediction heads predict bytes t+1..t+n.", "",
        "## Architecture", "",
        f"- {c.n_in} local block(s) in, {c.n_out} out: width {c.d_local}, {c.n_heads} query / {c.n_kv_heads} "
        f"key-value heads, sliding window {c.window} bytes, ALiBi, SwiGLU (mlp_ratio {c.mlp_ratio:g})",
    ]
    if rc is not None:
        lines.append(f"- {c.n_latent} latent block(s): width {c.d_latent}, {c.n_latent_heads} query / "
                     f"{c.n_latent_kv_heads} key-value heads")
    lines += [
        f"- router: {router}",
        f"- {c.n_predict} prediction head(s) (head h predicts byte t+h; heads 2.. drive self-speculative decoding)",
        f"- context: {c.max_seq_len} bytes", "",
        "| | |", "| --- | --- |",
        f"| parameters | {n_params:,} |",
        f"| inference FLOPs per byte | {fpb['inference']:,.0f} |",
        f"| training FLOPs per byte | {fpb['training']:,.0f} (3 x forward) |",
        f"| weights | `{WEIGHTS}`, {dtype}{' (rounded from the fp32 training weights)' if dtype == 'bf16' else ''} |",
        "", "The full config is in `config.json`.", "",
        "## Training", "",
        f"- steps: {training.get('step')}, bytes seen: {_count(training.get('bytes_seen'))}",
        f"- {training.get('world_size')} rank(s), ZeRO stage {training.get('zero_stage')}, "
        f"optimizer {training.get('optimizer')}",
        f"- training data: {_paths(training['data'].get('train'))}",
        f"- validation data: {_paths(training['data'].get('val')) if training['data'].get('val') else 'the val split of the training data'}",
        f"- sequence length: {training['data'].get('seq_len')} bytes", "",
        "## Evaluation (last eval before this checkpoint, causal routing)", "",
    ]
    heads = [k for k in sorted(ev) if k.startswith("bpb_head")]
    if heads:
        lines += ["| head | bits per byte |", "| --- | --- |"]
        lines += [f"| {k.removeprefix('bpb_head')} (byte t+{k.removeprefix('bpb_head')}) | {ev[k]:.4f} |" for k in heads]
        if "bpb_topk_4batches" in ev:
            lines += ["", f"Head 1 with top-k routing (looks ahead; 4 batches): {ev['bpb_topk_4batches']:.4f} bits per byte."]
        if "bytes" in ev:
            lines += ["", f"Scored bytes: {_count(ev['bytes'])}."]
    else:
        lines.append("No evaluation was recorded before this checkpoint (`pico eval --model DIR` measures it).")
    stats = {k.removeprefix("router/"): v for k, v in sorted(ev.items()) if k.startswith("router/")}
    lines += ["", "## Routing statistics (same evaluation)", ""]
    if stats:
        lines += ["| statistic | value |", "| --- | --- |"] + [f"| {k} | {_num(v)} |" for k, v in stats.items()]
    else:
        lines.append("None recorded." if rc is not None else "This model has no router.")
    lines += ["", "## Use", ""] + (use if use is not None else [
        "```", "pico generate --model DIR --prompt 'The ' --max-bytes 200", "pico eval --model DIR --data FILE_OR_SHARDS", "```", "",
        "```python", "from pico.pipeline.release.load import load_release", "model, info = load_release('DIR')  "
        "# safetensors + JSON only; checksums verified", "```", ""]) + [
        "## Files", "",
        files or (f"`{WEIGHTS}` (weights; training record in its metadata), `{CONFIG}` (model config, release format "
                  f"{FORMAT_VERSION}), `{CARD}` (this card), `{SUMS}` (`sha256sum -c {SUMS}`)."), "",
    ]
    return "\n".join(lines)


def _count(n: Any) -> str:
    return f"{n:,}" if isinstance(n, int) else str(n)


def _num(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _paths(paths: Any) -> str:
    if not paths:
        return "not recorded"
    return ", ".join(f"`{p}`" for p in (paths if isinstance(paths, list) else [paths]))


# ----------------------------------------------------------------------------- files
