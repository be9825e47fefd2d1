"""The chunk router (H-Net boundaries, ratio loss, cap; model/routers/chunk.py) and the dechunking return
path (model/latent.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pico.model import build_model, flops_per_byte, param_count
from pico.model.config import n_routed
from pico.model.latent import dechunk
from pico.model.routers.base import pack_slots
from pico.model.routers.chunk import ChunkScorer, chunk_rate, ratio_loss
from pico.model.flops import flops_at_rate
from tests.model.conftest import tiny_config

RETURN_PATHS = [dict(router="chunk"), dict(router="chunk", dechunk=True), dict(router="spacelike", dechunk=True)]


def _bytes(B: int, T: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, T), generator=g)


# ----------------------------------------------------------------------------- boundaries


def test_scorer_starts_from_identity_and_the_sequence_starts_a_chunk():
    scorer = ChunkScorer(16)
    assert torch.equal(scorer.q_proj.weight, torch.eye(16)) and torch.equal(scorer.k_proj.weight, torch.eye(16))
    x = torch.randn(2, 9, 16)
    p = scorer(x)
    expect = 0.5 * (1 - torch.nn.functional.cosine_similarity(x[:, 1:], x[:, :-1], dim=-1))
    assert torch.all(p[:, 0] == 1)
    torch.testing.assert_close(p[:, 1:], expect)
    # incremental form: each position against its own predecessor
    torch.testing.assert_close(scorer.pair(x[:, 4:], x[:, 3:-1]), p[:, 4:])


@pytest.mark.parametrize("over", RETURN_PATHS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_routing_and_output_never_depend_on_later_bytes(over):
    model = build_model(tiny_config(**over)).eval()
    idx = _bytes(3, 48)
    s = 30
    later = idx.clone()
    later[:, s:] = _bytes(3, 48 - s, seed=1)
    with torch.no_grad():
        for routing in ("topk", "causal"):  # the chunk decision is causal in both modes
            a, b = model(idx, routing=routing), model(later, routing=routing)
            assert torch.equal(a.routed[:, :s], b.routed[:, :s])
            torch.testing.assert_close(a.logits[:, :s], b.logits[:, :s], rtol=0, atol=1e-5)
            assert not torch.allclose(a.logits[:, s:], b.logits[:, s:])


def test_training_and_causal_routing_are_the_same_model():
    model = build_model(tiny_config(router="chunk", dechunk=True)).eval()
    idx = _bytes(2, 40)
    with torch.no_grad():
        a, b = model(idx, routing="topk"), model(idx, routing="causal")
    assert torch.equal(a.routed, b.routed)
    torch.testing.assert_close(a.logits, b.logits)
    assert a.stats["causal_agreement"] == 1.0


# ----------------------------------------------------------------------------- ratio loss and cap


def test_ratio_loss_is_one_at_the_target_and_pushes_toward_it():
    T = 1000
    b = torch.zeros(1, T, dtype=torch.bool)
    b[:, :200] = True  # F = 0.2 = capacity
    p = torch.full((1, T), 0.2, requires_grad=True)
    assert float(ratio_loss(b, p, 0.2).detach()) == pytest.approx(1.0)
    for frac, sign in ((0.5, 1), (0.05, -1)):  # too many boundaries: lower p; too few: raise it
        b = torch.arange(T).unsqueeze(0) < frac * T
        p = torch.full((1, T), 0.5, requires_grad=True)
        ratio_loss(b, p, 0.2).backward()
        assert torch.sign(p.grad.sum()) == sign


def test_ratio_loss_pulls_the_boundary_rate_toward_capacity():
    torch.manual_seed(0)
    model = build_model(tiny_config(router="chunk", capacity=0.1, aux_loss_weight=1.0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx, targets = model.make_targets(_bytes(4, 67))
    rates = []
    for _ in range(25):
        out = model(idx, targets)
        rates.append(out.stats["boundary_frac"])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert rates[0] > 0.3  # identity projections: about every other random byte turns the residual by > 90 deg
    late = sum(rates[-8:]) / 8
    assert abs(late - 0.1) < 0.05, rates


def test_cap_overflow_is_counted_not_silent():
    cfg = tiny_config(router="chunk", capacity=0.05, chunk_cap=0.05)  # 4 slots of max_seq_len 64
    assert n_routed(chunk_rate(cfg), cfg.max_seq_len) == 4
    model = build_model(cfg)
    with torch.no_grad():
        out = model(_bytes(3, 64))
    assert out.routed.sum(1).max() == 4
    assert out.stats["boundary_frac"] > out.stats["routed_frac_mean"]
    dropped = out.stats["boundary_frac"] * 3 * 64 - out.routed.sum().item()
    assert out.stats["chunk_overflow"] == pytest.approx(dropped, abs=1e-3) and dropped > 0
    assert out.stats["chunk_overflow_frac"] == pytest.approx(dropped / (out.stats["boundary_frac"] * 3 * 64))
    assert out.stats["chunk_overflow_seqs"] == 1.0


def test_default_cap_is_twice_capacity():
    assert chunk_rate(tiny_config(router="chunk", capacity=0.2)) == pytest.approx(0.4)
    assert chunk_rate(tiny_config(router="chunk", capacity=0.7)) == 1.0
    assert chunk_rate(tiny_config(router="chunk", capacity=0.2, chunk_cap=0.3)) == pytest.approx(0.3)


# ----------------------------------------------------------------------------- dechunking


def naive_dechunk(y, mask, prob):
    """The reference: walk each sequence byte by byte, keeping the EMA of the chunks seen."""
    B, T = mask.shape
    rows = []
    for b in range(B):
        j, ema, out = -1, torch.zeros_like(y[b, 0]), []
        for t in range(T):
            if mask[b, t]:
                j += 1
                P = 1.0 if prob is None else prob[b, t]
                ema = P * y[b, j] + (1 - P) * ema
            if j < 0:
                out.append(torch.zeros_like(ema))
                continue
            c = 1.0 if prob is None else (prob[b, t] if mask[b, t] else 1 - prob[b, t])
            out.append(ema * (1 + c - c.detach()) if prob is not None else ema)
        rows.append(torch.stack(out))
    return torch.stack(rows)


def _slots(mask: torch.Tensor, K: int):
    idx, pos, valid = pack_slots(mask, K)
    return idx, valid


@pytest.mark.parametrize("rule", [False, True])
def test_dechunk_equals_the_naive_loop(rule):
    torch.manual_seed(0)
    B, T, d = 3, 30, 5
    mask = torch.rand(B, T) < 0.3
    mask[0, 0] = True
    mask[1, :4] = False  # bytes before the first boundary get nothing
    K = int(mask.sum(1).max()) + 2  # padding slots after the real ones
    idx, valid = _slots(mask, K)
    y = torch.randn(B, K, d, requires_grad=True)
    prob = None if rule else torch.where(mask, 0.5 + 0.5 * torch.rand(B, T), 0.5 * torch.rand(B, T)).requires_grad_()
    got = dechunk(y, idx, valid, mask, prob)
    want = naive_dechunk(y, mask, prob)
    torch.testing.assert_close(got, want)
    w = torch.randn(B, T, d)
    g_got = torch.autograd.grad((got * w).sum(), [y] + ([] if rule else [prob]))
    g_want = torch.autograd.grad((want * w).sum(), [y] + ([] if rule else [prob]))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)
    if rule:  # probability 1: each byte gets its chunk's output unchanged
        assert torch.equal(got[mask], y[valid])


def test_dechunk_model_starts_as_the_identity_plus_chunk_outputs():
    model = build_model(tiny_config(router="spacelike", dechunk=True))
    assert torch.count_nonzero(model.return_path.residual.weight) == 0
    assert model.cfg.router == "spacelike"
    out = model(_bytes(2, 40))
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("over", RETURN_PATHS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_return_init_scales_what_the_latent_path_adds_at_init(over):
    added = {}
    for gain in (1.0, 0.25):
        torch.manual_seed(0)
        model = build_model(tiny_config(return_init=gain, **over)).eval()
        assert torch.all(model.latent.norm.weight == gain)
        seen = {}
        model.return_path.register_forward_hook(lambda m, args, out: seen.setdefault("d", out - args[0]))
        with torch.no_grad():
            model.trunk(_bytes(2, 40))
        added[gain] = seen["d"]
    # the same routing and the same latent output, returned at a quarter of the scale
    assert torch.allclose(added[0.25], added[1.0] / 4, atol=1e-6)
    assert added[1.0].abs().max() > 1e-3


@pytest.mark.parametrize("over", RETURN_PATHS + [dict(router="learned")], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_router_stats_report_the_scale_the_latent_output_returns_at(over):
    seen = {}
    torch.manual_seed(0)
    model = build_model(tiny_config(**over))
    back = model.return_path

    def spy(m, args, out):
        x = args[0]
        d = out - x if not model.cfg.dechunk else out - x - back.residual(x)
        touched = d.abs().sum(-1) > 0 if not model.cfg.dechunk else torch.ones_like(d[..., 0], dtype=torch.bool)
        seen["want"] = (d[touched].pow(2).mean() / x.pow(2).mean()).sqrt().item()

    back.register_forward_hook(spy)
    stats = model(_bytes(2, 40)).stats
    assert stats["return_rms_ratio"] == pytest.approx(seen["want"], rel=1e-4)


# ----------------------------------------------------------------------------- FLOPs and parameters


@pytest.mark.parametrize("over", RETURN_PATHS + [dict(router="learned", dechunk=True), dict(router="entropy"),
                                  dict(router="entropy", dechunk=True)],
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_param_count_matches_the_model(over):
    cfg = tiny_config(**over)
    assert param_count(cfg) == sum(p.numel() for p in build_model(cfg).parameters())


def test_flops_report_capacity_cap_and_measured_rate():
    cfg = tiny_config(router="chunk", capacity=0.2)
    f = flops_at_rate(cfg, measured_rate=0.3)
    assert f["at_capacity"] == pytest.approx(flops_per_byte(cfg))
    assert f["at_capacity"] < f["at_measured"] < f["at_cap"]
    model = build_model(cfg)
    out = model(_bytes(2, 64))
    assert out.stats["flops_per_byte_at_rate"] == pytest.approx(
        flops_per_byte(cfg, rate=out.stats["routed_frac_mean"]))
    learned = tiny_config(router="learned", capacity=0.2)
    assert flops_per_byte(cfg) == pytest.approx(flops_per_byte(learned), rel=0.05)  # matched at capacity


# ----------------------------------------------------------------------------- config and decoding


@pytest.mark.parametrize("override, key", [
    ("--model.capacity=1.5", "model.capacity"), ("--model.capacity=0", "model.capacity"),
    ("--model.chunk_cap=0.1", "model.chunk_cap"), ("--model.chunk_cap=1.5", "model.chunk_cap"),
    ("--model.return_init=0", "model.return_init"), ("--model.return_init=-1", "model.return_init"),
    ("--model.dechunk_skip=linear", "model.dechunk_skip"),  # retired: refused, naming the key
    ("--model.mlp_ratio=0", "mlp_ratio=0"), ("--model.norm_eps=0", "model.norm_eps"),
    ("--model.init_std=-0.02", "model.init_std"), ("--model.n_latent_heads=0", "n_latent_heads"),
])
def test_bad_chunk_options_name_the_key(override, key):
    from pico.configs.errors import ConfigError
    from pico.configs.tree import load_config
    from pico.pipeline.release.load import check_model_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:  # what `pico train` runs before training
        check_model_config(load_config("configs/quickstart.yaml", ["--model.router=chunk", override]).model)
    assert "\n" not in str(e.value)


def test_dechunk_needs_a_router():
    from pico.configs.errors import ConfigError
    from pico.configs.tree import load_config

    with pytest.raises(ConfigError, match=r"model\.dechunk"):
        load_config("configs/vanilla.yaml", ["--model.dechunk=true"])
    for router in ("chunk", "spacelike", "learned"):
        assert load_config("configs/quickstart.yaml", [f"--model.router={router}", "--model.dechunk=true"]).model.dechunk


# ----------------------------------------------------------------------------- pico train


def _write_shards(root: Path) -> Path:
    """Train and val shards of English-like text in pico's format (data_prep.shards' writer)."""
    import random

    from pico.data_prep.shards import TarShardWriter, compressor, sample_key

    rng = random.Random(0)
    words = "the router learns where chunks begin and the latent blocks see one position per chunk".split()
    root.mkdir(parents=True)
    cctx = compressor(3)
    for split, n in (("train", 24), ("val", 4)):
        w = TarShardWriter(split, 1 << 30, lambda s, j: (open(root / f"{s}-{j:06d}.tar", "wb"), lambda: None))
        for i in range(n):
            doc = " ".join(rng.choice(words) for _ in range(300)).encode()
            meta = json.dumps({"source": "t", "id": str(i), "chunk": 0, "n_chunks": 1, "bytes": len(doc)}).encode()
            w.write(sample_key(f"{split}{i}".encode().ljust(16, b"."), 0, 1), len(doc), cctx.compress(doc), meta)
        w.close()
    return root


def test_pico_train_quickstart_with_router_chunk(tmp_path):  # about 5 s
    shards = _write_shards(tmp_path / "shards")
    out = tmp_path / "run"
    tiny = ["--model.d_local=32", "--model.n_heads=2", "--model.n_kv_heads=1", "--model.window=32",
            "--model.n_in=1", "--model.n_out=1", "--model.d_latent=64", "--model.n_latent=1",
            "--model.n_latent_heads=2", "--model.n_latent_kv_heads=1", "--model.max_seq_len=64",
            "--model.n_predict=2", "--data.seq_len=64", "--data.batch_size=4", "--data.shuffle_buffer=8",
            "--train.steps=6", "--train.eval_every=6", "--train.eval_batches=2", "--train.log_every=2",
            "--checkpoint.every=6", "--logging.wandb_mode=disabled", "--optim.warmup_steps=2"]
    cmd = [sys.executable, "-m", "pico.pipeline.cli", "train", "--config", "configs/quickstart.yaml",
           "--model.router=chunk", "--model.dechunk=true", "--optim.lr_scale_local=2", "--optim.lr_scale_router=0.5",
           f"--data.train=[{shards}]", f"--train.out_dir={out}", "--no-progress", *tiny]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert len(train) == 3 and all(r["loss"] == r["loss"] for r in train)
    for key in ("router/boundary_frac", "router/chunk_overflow", "router/aux_loss", "router/flops_per_byte_at_rate"):
        assert key in train[-1], sorted(train[-1])
    outs = []
    for spec in ("--speculative", "--no-speculative"):  # greedy: self-speculative decoding gives plain's bytes
        gen = subprocess.run([sys.executable, "-m", "pico.pipeline.cli", "generate", "--model", str(out), "--prompt",
                              "the ", "--max-bytes", "40", "--json", spec], env=env, capture_output=True, text=True,
                             timeout=120)
        assert gen.returncode == 0, gen.stderr[-2000:]
        outs.append(json.loads(gen.stdout)["outputs"])
    assert outs[0] == outs[1] and len(outs[0]) == 1


def test_chunk_lengths_cover_the_bytes_after_the_first_boundary():
    from pico.model.routers.base import chunk_lengths

    mask = torch.tensor([[1, 0, 0, 1, 0, 1], [0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    assert sorted(chunk_lengths(mask).tolist()) == [1, 2, 3, 4]
    out = build_model(tiny_config(router="chunk")).eval()(_bytes(2, 50))
    assert 1 <= out.stats["chunk_len_p50"] <= out.stats["chunk_len_p90"]
