"""SOAP: Adam run in the eigenbasis of Shampoo's preconditioner, sharded by whole matrices.

Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using Adam" (arXiv 2409.11321),
Algorithm 3 for the update and its QR step (one power iteration) for refreshing the basis.
For a weight W (m, n) with gradient G, each step:

    M  <- b1 M + (1 - b1) G                       # first moment
    G' =  Q_L^T G Q_R,  M' = Q_L^T M Q_R          # rotate into the eigenbasis
    V  <- b2 V + (1 - b2) G' * G'                 # second moment, kept in the rotated basis
    W  <- W (1 - lr wd) - lr Q_L [M'/(1-b1^t) / (sqrt(V/(1-b2^t)) + eps)] Q_R^T
    L  <- s L + (1 - s) G G^T,  R <- s R + (1 - s) G^T G
    every f steps: Q <- QR(P Q) for P in (L, R), columns first sorted by Q^T P Q's diagonal

The first gradient only fills L and R and gives their full eigendecomposition (eigh); the
weights move from the second step on, and t counts these Adam steps. The first gradient
rotated into its own eigenbasis is diagonal (Q_L^T G Q_R is G's singular values), so an update
from it would be Adam's normalisation of rounding noise off the diagonal: full-size steps in
random directions. Tensors with no rotated dimension (plain Adam) update from the first step.

M is stored rotated, as M' (rotation is linear, so b1 M' + (1 - b1) G' is the paper's M
rotated): one projection per step fewer. When the basis is refreshed, M' goes back with the
old Q and on with the new one, so column order and signs need no bookkeeping; V's entries are
permuted with the sorted columns so each stays with its eigen-direction. Dimensions longer
than `max_precond_dim`, and 1-D parameters unless `precondition_1d`, get no rotation (Q = I):
a tensor with no rotated dimension is plain Adam. Weight decay is decoupled (AdamW's).

Sharding (ZeRO-1 at matrix granularity, as distributed Shampoo does). DeepSpeed runs at
ZeRO stage 0: it all-reduces full gradients and hands this optimizer the real parameters.
When a process group with more than one rank is initialised, every parameter gets one owner
rank (greedy balance of optimizer-state bytes, deterministic, identical on every rank); a rank
updates and keeps state only for the parameters it owns, so the preconditioner sees whole
matrices, then the new values travel from the owners to everyone (by default one broadcast
of a flat buffer per owning rank; measured on 2 gloo ranks for Pico quickstart's 10 MB of
weights: 5.5 ms, against 9.0 ms for one padded all-gather). With one rank, or no process group, this is plain SOAP.
Parameters and state are fp32; bf16 runs keep fp32 weights and use autocast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Sharding:
    """Who owns which parameter: `owners[i]` is the rank (in the process group) owning the i-th
    parameter, counted across param_groups in order."""

    world_size: int
    rank: int
    owners: tuple[int, ...]


def work_shape(shape: torch.Size, max_precond_dim: int, merge_dims: bool) -> tuple[int, ...]:
    """The shape SOAP preconditions: dimensions of size 1 are dropped, so a (1, n) weight is the
    vector it is (Adam, unless precondition_1d) and a scalar becomes (1,); with `merge_dims`,
    neighbouring dimensions are merged greedily from the first while their product stays <=
    max_precond_dim, as the reference SOAP's merge_dims does (so a weight with fewer elements than
    that becomes one vector: Adam, unless precondition_1d)."""
    dims = tuple(d for d in shape if d != 1) or (1,)
    if not merge_dims or len(dims) < 2:
        return dims
    merged: list[int] = []
    for d in dims:
        if merged and merged[-1] * d <= max_precond_dim:
            merged[-1] *= d
        else:
            merged.append(d)
    return tuple(merged)


def rotated_dims(shape: tuple[int, ...], max_precond_dim: int, precondition_1d: bool) -> list[bool]:
    """Per dimension of the work shape: does it get a Kronecker factor and an eigenbasis?"""
    if len(shape) == 1 and not precondition_1d:
        return [False]
    return [d <= max_precond_dim for d in shape]


def state_numel(shape: torch.Size, max_precond_dim: int, merge_dims: bool, precondition_1d: bool) -> int:
    """Elements of SOAP state for a parameter of this shape: M, V, and GG plus Q per rotated dim."""
    ws = work_shape(shape, max_precond_dim, merge_dims)
    n = 1
    for d in ws:
        n *= d
    rot = rotated_dims(ws, max_precond_dim, precondition_1d)
    return 2 * n + sum(2 * d * d for d, r in zip(ws, rot) if r)


def assign_owners(costs: list[int], world_size: int) -> tuple[int, ...]:
    """Greedy balancing: the largest item first, each to the least-loaded rank (lowest on ties).
    Deterministic, so every rank computes the same map without communicating."""
    load = [0] * world_size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += costs[i]
    return tuple(owners)


def project(x: torch.Tensor, qs: list[torch.Tensor | None]) -> torch.Tensor:
    """x multiplied by Q_k^T along every dimension k (Q_L^T X Q_R for a matrix).

    Each tensordot contracts the leading dimension and appends the result as the last one,
    so after one pass over all dimensions they are back in their original order. Matrices
    take plain matmuls, which avoid tensordot's transposed copies (2x faster going back)."""
    if x.ndim == 2:
        left, right = qs
        x = x if left is None else left.T @ x
        return x if right is None else x @ right
    for q in qs:
        x = x.movedim(0, -1) if q is None else torch.tensordot(x, q, dims=([0], [0]))
    return x


def project_back(x: torch.Tensor, qs: list[torch.Tensor | None]) -> torch.Tensor:
    """The inverse rotation: x multiplied by Q_k along every dimension k (Q_L X Q_R^T)."""
    if x.ndim == 2:
        left, right = qs
        x = x if left is None else left @ x
        return x if right is None else x @ right.T
    for q in qs:
        x = x.movedim(0, -1) if q is None else torch.tensordot(x, q, dims=([0], [1]))
    return x


def _accumulate_factor(gg: torch.Tensor, g: torch.Tensor, k: int, beta: float) -> None:
    """gg <- beta gg + (1 - beta) G_(k) G_(k)^T, the mode-k Gram matrix (G G^T for k=0 of a
    matrix, G^T G for k=1); matrices take addmm in place, without a temporary."""
    if g.ndim == 2:
        a = g if k == 0 else g.T
        gg.mul_(beta).addmm_(a, a.T, alpha=1 - beta)
        return
    other = [d for d in range(g.ndim) if d != k]
    gg.lerp_(torch.tensordot(g, g, dims=(other, other)), 1 - beta)


def _eigenbasis(gg: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of a symmetric PSD matrix, largest eigenvalue first, fp32.

    Falls back to fp64 when fp32 LAPACK fails, and also when it *silently* returns non-finite
    vectors: seen with torch 2.13's CPU build on 2 threads for rank-deficient factors (the
    byte embedding's factor, whose rows for unseen bytes are zero)."""
    try:
        _, vecs = torch.linalg.eigh(gg)
        if torch.isfinite(vecs).all():
            return vecs.flip(-1)
    except torch.linalg.LinAlgError:
        pass
    _, vecs = torch.linalg.eigh(gg.double())
    return vecs.to(gg.dtype).flip(-1)


class SOAP(torch.optim.Optimizer):
    """SOAP with decoupled weight decay, sharded across data-parallel ranks by whole parameters.

    Arguments follow the paper's defaults (Adam's bias correction always on). `process_group`: the data-parallel group whose ranks share the state (None:
    the default group when torch.distributed is initialised, else a single process). The group
    is read at the first step, so the optimizer may be built before `deepspeed.initialize`.
    `sync`: how new values reach the other ranks, "broadcast" (one flat broadcast per owning
    rank, no padding) or "allgather" (one padded all-gather per step).
    """

    def __init__(self, params: Iterable[Any], lr: float = 3e-3, betas: tuple[float, float] = (0.95, 0.95),
                 shampoo_beta: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.01,
                 precondition_frequency: int = 10, max_precond_dim: int = 10000, merge_dims: bool = False,
                 precondition_1d: bool = False, process_group: Any = None, sync: str = "broadcast") -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"SOAP: lr={lr}, eps={eps} and weight_decay={weight_decay} must be >= 0")
        if not all(0 <= b < 1 for b in (*betas, shampoo_beta)):
            raise ValueError(f"SOAP: betas={betas} and shampoo_beta={shampoo_beta} must lie in [0, 1)")
        if precondition_frequency < 1 or max_precond_dim < 1:
            raise ValueError("SOAP: precondition_frequency and max_precond_dim must be >= 1")
        if sync not in ("allgather", "broadcast"):
            raise ValueError(f"SOAP: sync={sync!r}; choose allgather or broadcast")
        defaults = dict(lr=lr, betas=tuple(betas), shampoo_beta=shampoo_beta, eps=eps, weight_decay=weight_decay,
                        precondition_frequency=precondition_frequency, max_precond_dim=max_precond_dim,
                        merge_dims=merge_dims, precondition_1d=precondition_1d)
        super().__init__(params, defaults)
        for p in self._params():
            if p.dtype != torch.float32:
                raise ValueError(f"SOAP keeps fp32 weights and state; got a {p.dtype} parameter of shape "
                                 f"{tuple(p.shape)}. Keep the model in fp32 and train bf16 under autocast")
        self.process_group = process_group
        self.sync = sync
        self._sharding: Sharding | None = None

    # -----------------------------------------------------------------------------------------
    # Ownership

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def sharding(self) -> Sharding:
        """The ownership map for the current process group (computed once, then cached)."""
        if dist.is_available() and dist.is_initialized():
            world, rank = dist.get_world_size(self.process_group), dist.get_rank(self.process_group)
        else:
            world, rank = 1, 0
        n = len(self._params())
        s = self._sharding
        if s is None or (s.world_size, s.rank, len(s.owners)) != (world, rank, n):
            costs = [state_numel(p.shape, g["max_precond_dim"], g["merge_dims"], g["precondition_1d"])
                     for g in self.param_groups for p in g["params"]]
            self._sharding = s = Sharding(world, rank, assign_owners(costs, world))
        return s

    # -----------------------------------------------------------------------------------------
    # The update

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One SOAP step on the parameters this rank owns, then share the new values."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        shard = self.sharding()
        i = 0
        for group in self.param_groups:
            for p in group["params"]:
                if shard.owners[i] == shard.rank and p.grad is not None:
                    self._update(p, group)
                i += 1
        if shard.world_size > 1:
            self._share(shard)
        return loss

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        if p.grad.is_sparse:
            raise RuntimeError("SOAP does not support sparse gradients")
        state = self.state[p]
        shape = work_shape(p.shape, group["max_precond_dim"], group["merge_dims"])
        g = p.grad.reshape(shape)
        if not state:
            self._init_state(state, g, group)
            if any(q is not None for q in state["Q"]):
                return  # the first gradient only seeds the preconditioner (see the module docstring)
        state["step"] += 1
        t = state["step"]
        b1, b2 = group["betas"]
        qs = state["Q"]

        m_rot, v = state["exp_avg"], state["exp_avg_sq"]
        g_rot = project(g, qs)
        m_rot.mul_(b1).add_(g_rot, alpha=1 - b1)
        v.mul_(b2).addcmul_(g_rot, g_rot, value=1 - b2)
        m_rot = m_rot / (1 - b1 ** t)
        denom = (v / (1 - b2 ** t)).sqrt_().add_(group["eps"])
        update = project_back(m_rot / denom, qs)

        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update.view_as(p), alpha=-group["lr"])

        self._accumulate(state, g, group["shampoo_beta"])
        if t % group["precondition_frequency"] == 0:
            self._refresh(state)

    def _init_state(self, state: dict[str, Any], g: torch.Tensor, group: dict[str, Any]) -> None:
        """Zero moments; Kronecker factors from the first gradient and their full eigenbases."""
        rot = rotated_dims(tuple(g.shape), group["max_precond_dim"], group["precondition_1d"])
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(g, memory_format=torch.contiguous_format)
        state["exp_avg_sq"] = torch.zeros_like(g, memory_format=torch.contiguous_format)
        state["GG"] = [g.new_zeros(d, d) if r else None for d, r in zip(g.shape, rot)]
        self._accumulate(state, g, group["shampoo_beta"])
        state["Q"] = [None if gg is None else _eigenbasis(gg) for gg in state["GG"]]

    @staticmethod
    def _accumulate(state: dict[str, Any], g: torch.Tensor, beta: float) -> None:
        for k, gg in enumerate(state["GG"]):
            if gg is not None:
                _accumulate_factor(gg, g, k, beta)

    @staticmethod
    def _refresh(state: dict[str, Any]) -> None:
        """One power iteration plus QR per factor, warm-started from the current basis.

        Columns are first sorted by their Rayleigh quotients (the eigenvalue estimates) so the
        basis stays ordered largest first; V is permuted the same way along that dimension,
        and M' is carried over into the new basis exactly (back with the old Q, on with the new)."""
        m = project_back(state["exp_avg"], state["Q"])
        v = state["exp_avg_sq"]
        for k, (gg, q) in enumerate(zip(state["GG"], state["Q"])):
            if gg is None:
                continue
            ggq = gg @ q
            order = torch.argsort((q * ggq).sum(0), descending=True, stable=True)
            v = v.index_select(k, order)
            state["Q"][k] = torch.linalg.qr(ggq[:, order]).Q
        state["exp_avg"] = project(m, state["Q"]).contiguous()
        state["exp_avg_sq"] = v

    # -----------------------------------------------------------------------------------------
    # Sharing new values

    def _share(self, shard: Sharding) -> None:
        """Copy every parameter from its owner to all ranks (a rank's own values are kept)."""
        params = self._params()
        owned = [[p for p, o in zip(params, shard.owners) if o == r] for r in range(shard.world_size)]
        sizes = [sum(p.numel() for p in ps) for ps in owned]
        group = self.process_group
        if self.sync == "broadcast":
            for r, ps in enumerate(owned):
                if not ps:
                    continue
                flat = torch.cat([p.reshape(-1) for p in ps]) if r == shard.rank else ps[0].new_empty(sizes[r])
                src = r if group is None else dist.get_global_rank(group, r)
                dist.broadcast(flat, src=src, group=group)
                if r != shard.rank:
                    self._unflatten(flat, ps)
            return
        width = max(sizes)
        mine = params[0].new_zeros(width)
        if owned[shard.rank]:
            torch.cat([p.reshape(-1) for p in owned[shard.rank]], out=mine[: sizes[shard.rank]])
        gathered = [torch.empty_like(mine) for _ in range(shard.world_size)]
        dist.all_gather(gathered, mine, group=group)
        for r, ps in enumerate(owned):
            if r != shard.rank:
                self._unflatten(gathered[r], ps)

    @staticmethod
    def _unflatten(flat: torch.Tensor, params: list[torch.Tensor]) -> None:
        offset = 0
        for p in params:
            p.copy_(flat[offset: offset + p.numel()].view_as(p))
            offset += p.numel()

    # -----------------------------------------------------------------------------------------
    # Checkpoints and accounting

    def state_dict(self) -> dict[str, Any]:
        """This rank's state only (moments, GG, Q, step of the parameters it owns), the param
        groups, and the ownership map with the world size it was made for."""
        sd = super().state_dict()
        s = self.sharding()
        sd["sharding"] = {"world_size": s.world_size, "rank": s.rank, "owners": list(s.owners)}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load this rank's shard; refuse a state saved for another world size, rank or layout."""
        state_dict = dict(state_dict)
        saved = state_dict.pop("sharding", None)
        s = self.sharding()
        if saved is None:
            raise ValueError("SOAP.load_state_dict: this state has no 'sharding' entry, so it was not saved "
                             "by pico's SOAP; load a checkpoint written by SOAP.state_dict()")
        if saved["world_size"] != s.world_size:
            raise ValueError(f"SOAP state was saved with world size {saved['world_size']} but this run has world "
                             f"size {s.world_size}: SOAP's state is sharded by parameter across ranks and cannot "
                             f"be re-sharded. Resume on {saved['world_size']} data-parallel ranks, or restart the "
                             "optimizer state (load weights only)")
        if saved["rank"] != s.rank:
            raise ValueError(f"SOAP state of rank {saved['rank']} offered to rank {s.rank}: each rank must load "
                             "the shard it saved (save optimizer.state_dict() per rank)")
        if tuple(saved["owners"]) != s.owners:
            raise ValueError("SOAP state was saved for a different set or order of parameters (the ownership "
                             "maps differ): build the model and optimizer as in the run that saved it")
        super().load_state_dict(state_dict)

    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state held on this rank."""
        def nbytes(x: Any) -> int:
            if isinstance(x, torch.Tensor):
                return x.numel() * x.element_size()
            if isinstance(x, (list, tuple)):
                return sum(nbytes(y) for y in x)
            return 0

        return sum(nbytes(v) for st in self.state.values() for v in st.values())
