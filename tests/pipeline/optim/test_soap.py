"""SOAP against the paper's algorithm written out by hand, and its sharding on real gloo ranks.

The reference below is independent of pipeline/optim/soap.py: plain matrix products for one matrix
(explicit L and R EMAs, eigh, rotation, Adam in the rotated basis, rotation back, bias
correction, decoupled weight decay, and the sorted power-iteration + QR refresh).
"""

from __future__ import annotations

import io
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pico.pipeline.optim.soap import SOAP, assign_owners, project, project_back, work_shape

LR, B1, B2, SB, EPS, WD = 0.01, 0.9, 0.99, 0.8, 1e-8, 0.1


def _grads(shape, steps: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) * (1 + 0.3 * t) for t in range(steps)]


def _descending_eigh(p: torch.Tensor) -> torch.Tensor:
    _, vecs = torch.linalg.eigh(p)
    return vecs[:, torch.arange(p.shape[0] - 1, -1, -1)]


def _qr_refresh(p: torch.Tensor, q: torch.Tensor, v: torch.Tensor, axis: int):
    """Paper's refresh: order columns by estimated eigenvalue diag(Q^T P Q), then Q = QR(P Q)."""
    est = torch.diagonal(q.T @ p @ q)
    order = torch.argsort(est, descending=True, stable=True)
    q = q[:, order]
    v = v[order, :] if axis == 0 else v[:, order]
    return torch.linalg.qr(p @ q)[0], v


def reference_soap(w0, grads, freq, left=True, right=True):
    """Algorithm 3 of Vyas et al. for one matrix; `left`/`right` False means Q = I on that side."""
    m, n = w0.shape
    w, mom, v = w0.clone(), torch.zeros(m, n), torch.zeros(m, n)
    big_l, big_r = torch.zeros(m, m), torch.zeros(n, n)
    ql, qr = torch.eye(m), torch.eye(n)
    for t, g in enumerate(grads):
        if t == 0:  # the first gradient only seeds L, R and their eigenbases
            big_l = (1 - SB) * g @ g.T
            big_r = (1 - SB) * g.T @ g
            ql = _descending_eigh(big_l) if left else ql
            qr = _descending_eigh(big_r) if right else qr
            continue
        mom = B1 * mom + (1 - B1) * g
        g_rot = ql.T @ g @ qr
        v = B2 * v + (1 - B2) * g_rot * g_rot
        m_hat = (ql.T @ mom @ qr) / (1 - B1**t)
        v_hat = v / (1 - B2**t)
        w = w * (1 - LR * WD) - LR * (ql @ (m_hat / (v_hat.sqrt() + EPS)) @ qr.T)
        big_l = SB * big_l + (1 - SB) * g @ g.T
        big_r = SB * big_r + (1 - SB) * g.T @ g
        if t % freq == 0:
            if left:
                ql, v = _qr_refresh(big_l, ql, v, 0)
            if right:
                qr, v = _qr_refresh(big_r, qr, v, 1)
    return w


def reference_adamw(w0, grads):
    w, mom, v = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
    for t, g in enumerate(grads, start=1):
        mom = B1 * mom + (1 - B1) * g
        v = B2 * v + (1 - B2) * g * g
        w = w * (1 - LR * WD) - LR * (mom / (1 - B1**t)) / ((v / (1 - B2**t)).sqrt() + EPS)
    return w


def _run_soap(w0, grads, **kw):
    p = torch.nn.Parameter(w0.clone())
    opt = SOAP([p], lr=LR, betas=(B1, B2), shampoo_beta=SB, eps=EPS, weight_decay=WD, **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest element difference relative to the reference's largest element."""
    return ((a - b).abs().max() / b.abs().max()).item()


def test_matches_paper_algorithm_through_two_refreshes():
    w0 = torch.randn(5, 5, generator=torch.Generator().manual_seed(1))
    grads = _grads((5, 5), 12, seed=2)  # 11 Adam steps; refreshes after steps 5 and 10
    got, opt = _run_soap(w0, grads, precondition_frequency=5)
    want = reference_soap(w0, grads, freq=5)
    assert _rel(got - w0, want - w0) < 1e-4
    state = opt.state[next(iter(opt.state))]
    assert state["step"] == 11 and [q.shape for q in state["Q"]] == [(5, 5), (5, 5)]


def test_one_sided_when_a_dimension_is_too_long():
    w0 = torch.randn(3, 6, generator=torch.Generator().manual_seed(3))
    grads = _grads((3, 6), 7, seed=4)
    got, opt = _run_soap(w0, grads, precondition_frequency=3, max_precond_dim=4)
    assert _rel(got - w0, reference_soap(w0, grads, freq=3, right=False) - w0) < 1e-4
    state = opt.state[next(iter(opt.state))]
    assert state["Q"][1] is None and state["GG"][1] is None


@pytest.mark.parametrize("shape, kw", [((7,), {}), ((1, 7), {}), ((3, 4), {"max_precond_dim": 2})])
def test_falls_back_to_adam(shape, kw):
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    grads = _grads(shape, 6, seed=6)
    got, opt = _run_soap(w0, grads, precondition_frequency=2, **kw)
    torch.testing.assert_close(got, reference_adamw(w0, grads), rtol=1e-5, atol=1e-6)
    assert all(q is None for q in opt.state[next(iter(opt.state))]["Q"])


def test_precondition_1d_rotates_vectors():
    w0 = torch.randn(6, generator=torch.Generator().manual_seed(7))
    grads = _grads((6,), 3, seed=8)
    _, opt = _run_soap(w0, grads, precondition_1d=True)
    assert opt.state[next(iter(opt.state))]["Q"][0].shape == (6, 6)


def test_tensor_rotation_matches_einsum_and_merge_dims():
    x = torch.randn(2, 3, 4)
    qs = [torch.linalg.qr(torch.randn(d, d))[0] for d in (2, 3, 4)]
    want = torch.einsum("abc,ai,bj,ck->ijk", x, *qs)
    torch.testing.assert_close(project(x, qs), want)
    torch.testing.assert_close(project_back(project(x, [qs[0], None, qs[2]]), [qs[0], None, qs[2]]), x)
    assert work_shape(torch.Size([2, 3, 4]), 6, merge_dims=True) == (6, 4)
    assert work_shape(torch.Size([]), 6, merge_dims=False) == (1,)
    assert work_shape(torch.Size([1, 5, 1]), 6, merge_dims=False) == (5,)  # a (1, n) weight is a vector


def test_owner_assignment_is_balanced_and_deterministic():
    assert assign_owners([10, 7, 5, 3, 1], 2) == (0, 1, 1, 0, 1)  # loads 13 and 13
    assert assign_owners([4, 4, 4], 1) == (0, 0, 0)


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    """A square matrix, a wide one, a bias, a 3-D tensor and a matrix too long to precondition."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 6), (4, 8), (8,), (2, 3, 4), (3, 40)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _soap(params, **kw) -> SOAP:
    return SOAP(params, lr=LR, betas=(B1, B2), shampoo_beta=SB, weight_decay=WD, precondition_frequency=3,
                max_precond_dim=32, **kw)


def _rank_grads(step: int, rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(p.shape, generator=gen) for p in _params()]


def _train(opt: SOAP, params, steps: range, world: int) -> None:
    """Each rank's own gradient, averaged over ranks as DeepSpeed stage 0 does (sum, then / world)."""
    for step in steps:
        if world == 1:  # the single-process run sees the same averaged gradient
            per_rank = [_rank_grads(step, r) for r in range(2)]
            grads = [(a + b) * 0.5 for a, b in zip(*per_rank)]
        else:
            grads = _rank_grads(step, dist.get_rank())
            for g in grads:
                dist.all_reduce(g)
                g.mul_(1.0 / world)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()


def test_resume_is_exact_and_state_holds_factors():
    params = _params()
    opt = _soap(params)
    _train(opt, params, range(7), world=1)

    resumed = _params()
    first = _soap(resumed)
    _train(first, resumed, range(4), world=1)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    second = _soap(resumed)
    second.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    _train(second, resumed, range(4, 7), world=1)
    for a, b in zip(params, resumed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    st = second.state_dict()["state"][0]
    assert {"step", "exp_avg", "exp_avg_sq", "GG", "Q"} <= set(st) and st["step"] == 6  # 7 gradients, the first seeds


def test_refuses_parameters_that_are_not_fp32():
    with pytest.raises(ValueError, match="fp32"):
        SOAP([torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.bfloat16))])


# ---------------------------------------------------------------------------------------------
# Two gloo ranks


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


def _sharded_worker(rank: int, world: int, port: int, out: str) -> None:
    _init(rank, world, port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for sync in ("allgather", "broadcast"):
            params = _params()
            opt = _soap(params, sync=sync)
            _train(opt, params, range(7), world)
            result = {"params": [p.detach().clone() for p in params], "bytes": opt.optimizer_state_bytes()}

            # resume on the same two ranks: each saves and reloads its own shard
            resumed = _params()
            first = _soap(resumed, sync=sync)
            _train(first, resumed, range(4), world)
            buf = io.BytesIO()
            torch.save(first.state_dict(), buf)
            result["state"] = buf.getvalue()
            second = _soap(resumed, sync=sync)
            second.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
            _train(second, resumed, range(4, 7), world)
            result["resumed"] = [p.detach().clone() for p in resumed]
            torch.save(result, f"{out}/{sync}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    _exit_without_destructors()


@pytest.mark.distributed
def test_two_ranks_equal_one_process_and_shard_state(tmp_path, port):
    mp.spawn(_sharded_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    params = _params()
    opt = _soap(params)
    _train(opt, params, range(7), world=1)
    single_bytes = opt.optimizer_state_bytes()
    start = _params()
    for sync in ("allgather", "broadcast"):
        ranks = [torch.load(tmp_path / f"{sync}-rank{r}.pt", weights_only=False) for r in range(2)]
        for res in ranks:
            for p0, p, q, q_resumed in zip(start, params, res["params"], res["resumed"]):
                assert _rel(q - p0, p.detach() - p0) <= 1e-5
                torch.testing.assert_close(q_resumed, q, rtol=0, atol=0)
        per_rank = [res["bytes"] for res in ranks]
        assert max(per_rank) < single_bytes and sum(per_rank) == single_bytes, (per_rank, single_bytes)

    shard = torch.load(io.BytesIO(ranks[0]["state"]), weights_only=True)
    assert shard["sharding"]["world_size"] == 2
    with pytest.raises(ValueError, match="saved with world size 2 but this run has world size 1"):
        _soap(_params()).load_state_dict(shard)


def _deepspeed_worker(rank: int, world: int, port: int, out: str, clip: float) -> None:
    _init(rank, world, port)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    try:
        model = _tiny_model()
        opt = SOAP(model.parameters(), lr=LR, weight_decay=WD, precondition_frequency=2)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config={
            "train_micro_batch_size_per_gpu": 8, "gradient_clipping": clip, "zero_optimization": {"stage": 0}})
        for step in range(5):
            x, y = _batch(step, rank)
            loss = torch.nn.functional.mse_loss(engine(x), y)
            engine.backward(loss)
            engine.step()
        torch.save({"params": [p.detach().clone() for p in model.parameters()],
                    "bytes": opt.optimizer_state_bytes()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    _exit_without_destructors()


def _exit_without_destructors() -> None:
    """A worker that finished its work exits at once: C++ threads left by DeepSpeed's CPU comm op
    sometimes abort the interpreter's normal shutdown ("terminate called without an active
    exception", SIGABRT), which mp.spawn would report as a failed rank."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)


@pytest.mark.distributed
@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_deepspeed_stage0_two_ranks_equal_one_process(tmp_path, port, clip):
    mp.spawn(_deepspeed_worker, args=(2, port, str(tmp_path), clip), nprocs=2, join=True)
    model = _tiny_model()
    start = [p.detach().clone() for p in model.parameters()]
    opt = SOAP(model.parameters(), lr=LR, weight_decay=WD, precondition_frequency=2)
    for step in range(5):
        grads = []
        for rank in range(2):
            model.zero_grad()
            x, y = _batch(step, rank)
            torch.nn.functional.mse_loss(model(x), y).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for p, a, b in zip(model.parameters(), *grads):
            p.grad = (a + b) * 0.5
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for res in ranks:
        for p0, p, q in zip(start, model.parameters(), res["params"]):
            assert _rel(q - p0, p.detach() - p0) <= 1e-5
    assert max(r["bytes"] for r in ranks) < opt.optimizer_state_bytes()


def test_pico_routed_path_trains_with_soap():
    from pico.model import ModelConfig, build_model, make_targets

    from pico.configs.tree import OptimConfig
    from pico.pipeline.optim.build import build_optimizer

    torch.manual_seed(0)
    cfg = ModelConfig(d_local=32, n_heads=2, n_kv_heads=1, window=16, n_in=1, n_out=1, d_latent=64, n_latent=1,
                      n_latent_heads=2, n_latent_kv_heads=1, router="learned", capacity=0.25, n_predict=2,
                      max_seq_len=32)
    model = build_model(cfg)
    opt = build_optimizer(list(model.named_parameters()), OptimConfig(name="soap", lr=3e-3, precondition_frequency=3))
    text = b"the quick brown fox jumps over the lazy dog; " * 4
    seq = torch.tensor([list(text[i: i + 34]) for i in range(0, 64, 8)])
    idx, targets = make_targets(seq, cfg.n_predict)
    routed_latent = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(("router.", "latent"))}
    losses = []
    for _ in range(12):
        out = model(idx, targets)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(torch.isfinite(p).all() for p in model.parameters())
    moved = {n for n, p in model.named_parameters() if n in routed_latent and not torch.equal(p, routed_latent[n])}
    assert moved == set(routed_latent), set(routed_latent) - moved  # the router and latent blocks learn
    assert any(len([q for q in st["Q"] if q is not None]) == 2 for st in opt.state.values())
