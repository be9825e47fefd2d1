"""Learned dynamic chunking (`router: chunk`) and dechunking (`dechunk: true`), after H-Net.

H-Net (Hwang, Wang, Gu 2025, "Dynamic Chunking for End-to-End Hierarchical Sequence Modeling",
arXiv 2507.07955, section 2.2) learns where chunks start from the *change* between neighbouring
positions, and returns the chunk outputs to every byte. The facts pico takes from it:

- **Boundary probability** p_t = 0.5 * (1 - cos(W_q x_t, W_k x_{t-1})), with W_q and W_k
  initialised to the identity (so at the start a boundary is where the residual turns by more
  than 90 degrees), p_0 = 1 (a sequence starts a chunk), and a boundary where p_t >= 0.5. The
  decision at t reads x_{t-1} and x_t only, both causal, so training and generation route the
  same way: no top-k, no auxiliary predictor, no calibration.
- **Ratio loss** (their section 2.3) holds the boundary rate near a target 1/N (pico's
  `capacity`): N/(N-1) * ((N-1) F G + (1-F)(1-G)), with F the fraction of positions that are
  boundaries (a count, no gradient) and G the mean boundary probability. Its gradient in G is
  positive when F > 1/N and negative when F < 1/N; at F = G = 1/N it equals 1.
- **Dechunking** (their section 2.2, "smoothing module" and "upsampler"): the chunk outputs,
  in order, go through an EMA with the boundary probability, z_j = P_j y_j + (1 - P_j) z_{j-1},
  so a low-confidence boundary is blended with the chunk before it (the gradient of P_j is how
  the language loss teaches the boundary score); every byte then receives the smoothed output
  of its chunk (the chunk of its last boundary, repeated), times a straight-through estimator
  of its confidence c_t (p_t at a boundary, 1 - p_t elsewhere): 1 in the forward pass, c_t's
  gradient in the backward pass. The encoder output joins through a linear residual. H-Net
  reports removing the smoothing as its most damaging ablation.

Pico's own choices, not H-Net's:

- The latent path is pico's (`Pico.latent`): the boundary positions are gathered in order
  into the latent blocks and their outputs come back at width d_local. Without `dechunk` they
  are added at the boundary positions only (as for the other routers), scaled by the gate:
  p_t (`router_gate: sigmoid`) or 1 with p_t's gradient (`straight_through`).
- By default the residual stream of the local blocks is kept as it is (identity) and the linear
  residual is added to it, initialised to zero: pico's latent projections are not an identity at
  initialisation, so H-Net's residual-free sum would start the byte stream from noise.
  `dechunk_skip: linear` is H-Net's sum (the zero-initialised map alone), there to be measured.
- A cap on boundaries per sequence (`chunk_cap` x max_seq_len slots, `chunk_slots`) bounds the
  latent blocks' memory. Boundaries past the cap are not routed (those bytes join the last
  routed chunk) and are counted: `chunk_overflow`, `chunk_overflow_frac`,
  `chunk_overflow_seqs` in the router stats. The cap is a prefix rule, so it is causal too.
- Dechunking is also an option for the spacelike rule (boundary probability 1 at its positions,
  so the EMA passes each chunk through unchanged and the confidence is 1) and for the MoD
  router (probability sigmoid(score)), so that learned and rule routing can be compared with
  the same return path (H-Net's "space" baseline).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ChunkScorer(nn.Module):
    """Boundary probabilities p_t = 0.5 * (1 - cos(W_q x_t, W_k x_{t-1})), W_q = W_k = I at init."""

    def __init__(self, d: int):
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Identity projections: the first boundaries are where the residual stream turns."""
        with torch.no_grad():
            self.q_proj.weight.copy_(torch.eye(self.q_proj.weight.shape[0]))
            self.k_proj.weight.copy_(torch.eye(self.k_proj.weight.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """p (B, T) for residuals x (B, T, d) of a sequence that starts at x[:, 0] (p = 1 there)."""
        p = self.pair(x[:, 1:], x[:, :-1])
        return torch.cat([p.new_ones(p.shape[0], 1), p], dim=1)

    def pair(self, x: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
        """p (B, C) of residuals x (B, C, d) whose predecessors are x_prev (B, C, d): the full
        sequence above, or a decoding step (a chain's previous byte, a draft tree's parent)."""
        cos = F.cosine_similarity(self.q_proj(x).float(), self.k_proj(x_prev).float(), dim=-1)
        return (0.5 * (1 - cos)).clamp(0.0, 1.0)


def capped(boundaries: torch.Tensor, cap: int) -> torch.Tensor:
    """The first `cap` boundaries of each row of (B, T): a prefix rule, so still causal."""
    return boundaries & (boundaries.cumsum(1) <= cap)


def chunk_lengths(mask: torch.Tensor) -> torch.Tensor:
    """Lengths in bytes (1-D, every chunk of every row) of the chunks that routed positions mask
    (B, T) start: from a routed position up to the next one or the end of the row. Bytes before
    a row's first routed position belong to no chunk. For the chunk-length histogram."""
    B, T = mask.shape
    chunk = mask.long().cumsum(1) - 1  # (B, T)
    row = torch.arange(B, device=mask.device).unsqueeze(1) * (T + 1)
    ids = (row + chunk)[chunk >= 0]
    counts = torch.bincount(ids, minlength=B * (T + 1))
    return counts[counts > 0]


def ratio_loss(boundaries: torch.Tensor, p: torch.Tensor, capacity: float) -> torch.Tensor:
    """H-Net's ratio loss toward a boundary rate of `capacity` = 1/N, over all positions of the batch.

    F (fraction of boundaries) carries no gradient; G (mean probability) does. capacity = 1
    (N = 1, every byte a boundary) has no finite form; 1 - G pulls every probability up instead."""
    f = boundaries.float().mean()
    g = p.float().mean()
    if capacity >= 1.0:
        return 1.0 - g
    n = 1.0 / capacity
    return n / (n - 1) * ((n - 1) * f * g + (1 - f) * (1 - g))


def confidence_ste(c: torch.Tensor) -> torch.Tensor:
    """Exactly 1 in the forward pass, the gradient of c in the backward pass."""
    return 1.0 + (c - c.detach())


def ema_weights(prob: torch.Tensor, see: torch.Tensor | None = None) -> torch.Tensor:
    """(B, K, K) weights W[j, i] = P_i * prod_{l in (i, j]} (1 - P_l) of the EMA
    z_j = P_j y_j + (1 - P_j) z_{j-1} over K chunks with probabilities prob (B, K).

    `see` (B, K, K) bool, default lower-triangular, says which chunks are j's past (itself
    included): a draft tree's decoding step passes each chunk's ancestors, so the EMA runs along
    every root-to-node path at once (the past of a chunk's past must be its past too).
    Computed in float64 log space: a product of many (1 - P) underflows float32 and a division
    by it is undefined where P = 1 (the first chunk). Both logs are clamped at 1e-30, so a
    probability of exactly 0 or 1 keeps finite gradients."""
    P = prob.double()
    K = prob.shape[1]
    log_one_minus = torch.log((1 - P).clamp(min=1e-30))
    if see is None:  # a chain: j's past is every chunk up to j
        see = torch.ones(K, K, dtype=torch.bool, device=prob.device).tril()
        log_keep = log_one_minus.cumsum(1)  # (B, K): sum of log(1 - P_l) over j's past
    else:
        log_keep = torch.bmm(see.double(), log_one_minus.unsqueeze(-1)).squeeze(-1)
    log_w = torch.log(P.clamp(min=1e-30)).unsqueeze(1) + log_keep.unsqueeze(2) - log_keep.unsqueeze(1)  # [j, i]
    return torch.where(see, log_w, float("-inf")).exp()


def dechunk(y: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, mask: torch.Tensor,
            prob: torch.Tensor | None) -> torch.Tensor:
    """Per-byte latent output (B, T, d) from the chunk outputs y (B, K, d).

    y holds one output per routed position, in position order: slot j came from position
    idx[:, j] (valid (B, K); padding slots after the real ones). mask (B, T) marks the routed
    positions; prob (B, T) is the boundary probability (None for a rule: 1 at its positions, so
    no smoothing and confidence 1). Byte t gets the smoothed output of the last routed position
    <= t (0 before the first one), times the confidence straight-through estimator."""
    if prob is not None:
        P = torch.where(valid, prob.gather(1, idx), torch.ones_like(prob[:, :1]))  # (B, K)
        y = torch.bmm(ema_weights(P).to(y.dtype), y)  # (B, K, d): z_j
    chunk = mask.long().cumsum(1) - 1  # (B, T): slot of each byte's last routed position, -1 before any
    out = torch.gather(y, 1, chunk.clamp(min=0).unsqueeze(-1).expand(-1, -1, y.shape[-1]))  # (B, T, d)
    out = out * (chunk >= 0).unsqueeze(-1).to(out.dtype)
    if prob is not None:
        conf = torch.where(mask, prob, 1 - prob)
        out = out * confidence_ste(conf).unsqueeze(-1).to(out.dtype)
    return out
