"""FLOPs per byte and parameter counts of a ModelConfig, without building the model.

Conventions (SpaceByte's and Chinchilla's): a multiply-add is 2 FLOPs; only matrix products are
counted (norms, softmax, activations, the embedding lookup and the loss are a few percent at
most and are left out). A forward pass over a sequence of T = max_seq_len bytes, per byte:

- each local block: projections 2 * d_local * (q + k + v + out widths), SwiGLU 2 * 3 * d_local *
  hidden, attention 2 * 2 * d_local * keys where keys = mean over t < T of min(t + 1, window)
  (the keys a causal windowed query actually sees);
- the router: what its class says (`Router.macs`; model/routers/): 2 * d_local for the learned
  score, 2 * 2 * d_local^2 for the chunk router's W_q and W_k, 2 * d_local * 259 for the entropy
  router's early head, 0 for the spacelike rule;
- the latent path, per routed position, times k / T with k = ceil(capacity * T) routed positions:
  the two projections 2 * 2 * d_local * d_latent, and each latent block as above at width
  d_latent with keys = (k + 1) / 2 (causal among the routed positions, no window). `spacelike`
  is counted at the same k: training pads its slots to k, so that is what it costs. `chunk` is
  counted at k = capacity * T too, the rate its ratio loss holds; what a batch really routes
  varies, so `flops_at_rate` gives both bounds (capacity and the `chunk_cap` cap) and the model
  logs the cost at its measured rate (`router/flops_per_byte_at_rate`);
- `dechunk`: the linear residual d_local^2 plus
  the EMA over chunks, k^2 / T * d_local;
- `pooled_inputs`: the segment sums, d_local additions per byte (counted: the only non-matmul term,
  so that the option is visible in the count); hashed n-grams (`ngram_orders`): table lookups, no
  matrix product, d_local additions per order per byte (counted likewise);
- the heads: 2 * d_local * 259 each, plus each draft head's SwiGLU 2 * 3 * d_local * hidden.

Inference FLOPs per byte = that forward (self-speculative decoding evaluates every head on every
pass); training = 3 x forward (the backward pass costs twice the forward).

The router's own counts come from its class, so counting a routed config imports the router
package (and torch) on first use; importing this module does not.
"""

from __future__ import annotations

import dataclasses

from pico.model.config import NO_ROUTER, VOCAB_SIZE, ModelConfig, hidden_width, n_routed

GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
"""Dense bf16 peak FLOP/s of one GPU as the vendor states it (no sparsity): the denominator of MFU
in training logs and of the time estimate of `pico submit --dry-run`."""


def _block_macs(d: int, n_heads: int, n_kv_heads: int, mlp_ratio: float, keys: float) -> float:
    """Multiply-adds of one block for one query position that attends to `keys` keys."""
    head_dim = d // n_heads
    proj = d * (n_heads + 2 * n_kv_heads) * head_dim + d * d
    return proj + 3 * d * hidden_width(d, mlp_ratio) + 2 * d * keys


def _block_params(d: int, n_heads: int, n_kv_heads: int, mlp_ratio: float) -> int:
    head_dim = d // n_heads
    return 2 * d + d * (n_heads + 2 * n_kv_heads) * head_dim + d * d + 3 * d * hidden_width(d, mlp_ratio)


def _router(cfg: ModelConfig):
    """The Router class of cfg (None for router: none), imported on first use: it needs torch."""
    if cfg.router == NO_ROUTER:
        return None
    from pico.model.routers.base import router_class, validate_config

    validate_config(cfg)
    return router_class(cfg)


def flops_breakdown(cfg: ModelConfig, rate: float | None = None) -> dict[str, float]:
    """Forward FLOPs per byte by part: local, router, latent, heads (and their total).

    `rate` is the fraction of positions routed (default: ceil(capacity * T) of T), for costing
    what a chunk router (or causal routing) measured."""
    T = cfg.max_seq_len
    local_keys = sum(min(t + 1, cfg.window) for t in range(T)) / T
    local = (cfg.n_in + cfg.n_out) * _block_macs(cfg.d_local, cfg.n_heads, cfg.n_kv_heads, cfg.mlp_ratio, local_keys)
    router = latent = 0.0
    rc = _router(cfg)
    if rc is not None:
        k = n_routed(cfg.capacity, T) if rate is None else rate * T
        per_routed = 2 * cfg.d_local * cfg.d_latent + cfg.n_latent * _block_macs(
            cfg.d_latent, cfg.n_latent_heads, cfg.n_latent_kv_heads, cfg.mlp_ratio, (k + 1) / 2)
        latent = per_routed * k / T
        if cfg.dechunk:
            latent += cfg.d_local * cfg.d_local + k * k / T * cfg.d_local
        router = rc.macs(cfg)
        if cfg.pooled_inputs:
            latent += cfg.d_local / 2  # additions, halved: `parts` doubles multiply-adds
    heads = cfg.n_predict * cfg.d_local * VOCAB_SIZE + (cfg.n_predict - 1) * 3 * cfg.d_local * hidden_width(
        cfg.d_local, cfg.mtp_mlp_ratio)
    parts = {"local": 2 * local, "router": 2 * router, "latent": 2 * latent, "heads": 2 * heads}
    if cfg.ngram_orders:
        parts["ngrams"] = len(cfg.ngram_orders) * cfg.d_local
    parts["total"] = sum(parts.values())
    return parts


def flops_per_byte(cfg: ModelConfig, training: bool = True, rate: float | None = None) -> float:
    """Training (3 x forward) or inference (forward) FLOPs per byte of cfg (at a routed fraction `rate`)."""
    fwd = flops_breakdown(cfg, rate)["total"]
    return 3 * fwd if training else fwd


def flops_at_rate(cfg: ModelConfig, measured_rate: float | None = None, training: bool = True) -> dict[str, float]:
    """Training FLOPs per byte of a chunk router at its target rate (`capacity`, what budgets and
    `match_flops` use), at its cap (`chunk_cap`: the most a batch can cost) and, when given, at a
    measured boundary rate. Routers without a `max_rate` route a fixed count: all three are the config's."""
    rc = _router(cfg)
    cap = rc.max_rate(cfg) if rc is not None else None
    out = {"at_capacity": flops_per_byte(cfg, training), "at_cap": flops_per_byte(cfg, training, cap)}
    if measured_rate is not None:
        out["at_measured"] = flops_per_byte(cfg, training, measured_rate if cap is not None else None)
    return out


def param_count(cfg: ModelConfig) -> int:
    """Trainable parameters of `build_model(cfg)`, counted from the config alone."""
    d = cfg.d_local
    n = VOCAB_SIZE * d * 2 + d  # embedding, unembedding, final norm
    n += (cfg.n_in + cfg.n_out) * _block_params(d, cfg.n_heads, cfg.n_kv_heads, cfg.mlp_ratio)
    rc = _router(cfg)
    if rc is not None:
        n += rc.params(cfg)
        if cfg.dechunk:
            n += d * d  # the linear residual
        n += 2 * d * cfg.d_latent + cfg.d_latent  # projections in and out, latent norm
        n += cfg.n_latent * _block_params(cfg.d_latent, cfg.n_latent_heads, cfg.n_latent_kv_heads, cfg.mlp_ratio)
    n += (cfg.n_predict - 1) * (d + 3 * d * hidden_width(d, cfg.mtp_mlp_ratio))
    return n + len(cfg.ngram_orders) * cfg.ngram_buckets * d


def match_flops(cfg: ModelConfig, target: float, field: str, candidates, training: bool = True) -> ModelConfig:
    """cfg with `field` set to the candidate whose FLOPs per byte come closest to `target`.

    For configuring baselines at equal compute, e.g. the width of a `router: none` model that
    costs what a Pico costs: `match_flops(none_cfg, flops_per_byte(pico_cfg), "d_local", range(64, 513, 8))`.
    Candidates that the config rejects (say, a width that n_heads does not divide) are skipped.
    """
    best, best_gap = None, float("inf")
    for value in candidates:
        try:
            trial = dataclasses.replace(cfg, **{field: value})
        except ValueError:
            continue
        gap = abs(flops_per_byte(trial, training) - target)
        if gap < best_gap:
            best, best_gap = trial, gap
    if best is None:
        raise ValueError(f"match_flops: no valid config among the candidates for {field}")
    return best
