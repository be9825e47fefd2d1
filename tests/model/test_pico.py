"""The network: causality of the inference path, routing, MTP targets, losses, and overfitting."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from pico.model import PAD, VOCAB_SIZE, build_model, make_targets
from pico.model.config import n_routed
from pico.model.routers.learned import LearnedRouter

from .conftest import route_about_half, tiny_config

ROUTERS = ["learned", "spacelike", "none"]
TEXT = b"The cat sat on the mat. A dog ran in the fog, and the cat hid under a big red bed."


def text_batch(B: int, T: int) -> torch.Tensor:
    """B rows of T bytes of English, each starting at a different offset (so routing differs per row)."""
    data = list(TEXT * 4)
    return torch.tensor([data[3 * b: 3 * b + T] for b in range(B)])


@pytest.mark.parametrize("router", ROUTERS + ["chunk", "entropy"])
def test_causal_routing_never_lets_later_bytes_change_earlier_logits(router):
    model = build_model(tiny_config(router=router)).eval()
    if router == "entropy":  # a cut-off inside the entropies of a random head, so some but not all route
        route_about_half(model, text_batch(3, 48))
    if router == "chunk":  # W_q != W_k: boundaries at a rate between 0 and 1 on a random model
        with torch.no_grad():
            model.router.chunk.q_proj.weight.add_(0.6 * torch.randn_like(model.router.chunk.q_proj.weight))
    idx = text_batch(3, 48)
    out = model(idx, routing="causal")
    if router != "none":
        assert 0 < out.routed.sum() < out.routed.numel()
    for cut in (5, 20, 40):
        changed = idx.clone()
        changed[:, cut:] = torch.randint(0, 256, changed[:, cut:].shape)
        other = model(changed, routing="causal")
        assert_close(other.logits[:, :cut], out.logits[:, :cut])
        if router != "none":
            assert torch.equal(other.routed[:, :cut], out.routed[:, :cut])


@pytest.mark.parametrize("router", ["learned", "spacelike"])
def test_padding_slots_of_a_batch_do_not_leak_into_a_sequence(router):
    """A row gives the same logits alone as in a batch whose other row routes more positions."""
    model = build_model(tiny_config(router=router)).eval()
    idx = text_batch(2, 40)
    idx[1, :] = ord(" ") if router == "learned" else torch.tensor(list(b"a " * 20))
    both = model(idx, routing="causal")
    alone = model(idx[:1], routing="causal")
    assert_close(both.logits[:1], alone.logits)


def test_spacelike_topk_and_causal_agree_at_full_length():
    cfg = tiny_config(router="spacelike", max_seq_len=48, capacity=0.3)
    model = build_model(cfg).eval()
    idx = text_batch(3, 48)
    a, b = model(idx, routing="topk"), model(idx, routing="causal")
    assert torch.equal(a.routed, b.routed)
    assert_close(a.logits, b.logits)


def test_spacelike_routes_rule_positions_up_to_its_cap():
    cfg = tiny_config(router="spacelike", capacity=0.1)
    model = build_model(cfg)
    idx = text_batch(2, 60)
    out = model(idx)
    from pico.model import spacelike_boundaries

    rule = spacelike_boundaries(idx)
    assert not (out.routed & ~rule).any()  # never a non-rule position
    assert (out.routed.sum(1) == torch.minimum(rule.sum(1), torch.tensor(n_routed(0.1, 60)))).all()
    assert out.stats["rule_dropped_frac"] > 0


@pytest.mark.parametrize("T,capacity,k", [(64, 0.25, 16), (100, 0.2, 20), (10, 0.2, 2), (7, 0.5, 4)])
def test_topk_routes_exactly_capacity_times_T(T, capacity, k):
    model = build_model(tiny_config(capacity=capacity, max_seq_len=128))
    out = model(torch.randint(0, 256, (3, T)))
    assert n_routed(capacity, T) == k
    assert out.routed.sum(1).tolist() == [k] * 3
    assert out.stats["routed_frac_mean"] == pytest.approx(k / T)


def test_router_gathers_the_weights_of_the_selected_positions():
    """Scores rise with position, so the top k sit at the end: weights must come from there, not 0..k-1."""
    cfg = tiny_config(capacity=0.25)
    router = LearnedRouter(cfg)
    x = torch.randn(2, 16, cfg.d_local)
    ramp = torch.linspace(-3, 3, 16)
    with torch.no_grad():  # score = w . norm(x) + b; make the norm output carry the ramp
        router.score.weight.zero_()
        router.score.weight[0, 0] = 1.0
        router.norm.weight.zero_()
        router.norm.weight[0] = 1.0
        x[..., 0] = ramp * 10
        x[..., 1:] = 10.0
    r = router(x, torch.full((2, 16), ord("a")), "topk")
    assert r.idx.tolist() == [list(range(12, 16))] * 2
    scores = r.extra["scores"]
    assert_close(r.gate, torch.sigmoid(scores[:, 12:]))
    assert not torch.allclose(r.gate, torch.sigmoid(scores[:, :4]))


def test_language_loss_alone_trains_the_router():
    model = build_model(tiny_config(aux_loss_weight=0.0))
    out = model(*make_targets(text_batch(2, 40 + 3), 3))
    out.loss.backward()
    assert model.router.score.weight.grad.abs().sum() > 0


def test_mtp_targets_are_shifted_by_head():
    seq = torch.arange(20).view(2, 10)
    seq[1, -1] = PAD
    idx, targets = make_targets(seq, n_predict=3)
    assert idx.tolist() == [list(range(7)), list(range(10, 17))]
    assert targets.shape == (2, 7, 3)
    for h in (1, 2, 3):
        assert targets[0, :, h - 1].tolist() == list(range(h, h + 7))
    assert targets[1, -1].tolist() == [17, 18, -100]  # head 3 of the last byte would predict PAD
    with pytest.raises(ValueError, match="too short"):
        make_targets(seq, n_predict=10)


def test_loss_is_head1_plus_weighted_mean_of_draft_heads_plus_aux():
    cfg = tiny_config(n_predict=4, mtp_weight=0.3, aux_loss_weight=0.05)
    model = build_model(cfg)
    idx, targets = make_targets(text_batch(2, 36), 4)
    targets[0, :5] = -100  # ignored targets drop out of every head's mean
    out = model(idx, targets)
    hl = out.head_losses
    assert hl.shape == (4,)
    assert_close(out.loss.detach(), hl[0] + 0.3 * hl[1:].mean() + 0.05 * out.aux_loss)
    ref = torch.nn.functional.cross_entropy(out.logits[1].reshape(-1, VOCAB_SIZE), targets[1, :, 0])
    ref0 = torch.nn.functional.cross_entropy(out.logits[0, 5:].reshape(-1, VOCAB_SIZE), targets[0, 5:, 0])
    assert_close(hl[0], (ref * 32 + ref0 * 27) / 59)
    assert out.head_losses[0] == pytest.approx(math.log(VOCAB_SIZE), rel=0.05)  # near uniform at init
    assert model(idx, targets, return_logits=False).logits is None
    with pytest.raises(ValueError, match="n_predict=4"):
        model(idx, targets[..., :2])


def test_stats_are_reported_for_logging():
    model = build_model(tiny_config())
    stats = model(text_batch(2, 40)).stats
    for key in ("routed_frac_mean", "routed_frac_min", "routed_frac_max", "score_mean", "score_std",
                "score_p50", "aux_loss", "causal_agreement", "spacelike_share_of_routed",
                "routed_share_of_spacelike"):
        assert isinstance(stats[key], float), key
    assert 0 <= stats["causal_agreement"] <= 1
    assert build_model(tiny_config(router="none"))(text_batch(1, 20)).routed is None
    assert model(text_batch(2, 40), with_stats=False).stats == {}


def test_init_is_deterministic_given_the_seed():
    torch.manual_seed(3)
    a = build_model(tiny_config()).state_dict()
    torch.manual_seed(3)
    b = build_model(tiny_config()).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_errors_name_the_setting_to_change():
    model = build_model(tiny_config(max_seq_len=16))
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="routing="):
        model(torch.zeros(1, 4, dtype=torch.long), routing="top-k")


@pytest.mark.parametrize("router", ROUTERS)
def test_tiny_model_overfits_a_short_text(router):
    cfg = tiny_config(router=router, d_local=64, n_in=1, n_out=1, d_latent=64, window=64, n_predict=2,
                      max_seq_len=64, capacity=0.25)
    model = build_model(cfg)
    seq = torch.tensor([list(TEXT[:50])])
    idx, targets = make_targets(seq, 2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(100):
        out = model(idx, targets)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.head_losses[0] < 0.05, out.head_losses


def test_router_prior_starts_from_spacebytes_choice_and_is_learned():
    from pico.model import spacelike_boundaries

    model = build_model(tiny_config(router_prior=8.0, capacity=0.4))
    idx = text_batch(2, 48)
    out = model(*make_targets(torch.cat([idx, idx[:, :3]], 1), 3))
    rule = spacelike_boundaries(idx)
    assert (out.routed & rule).sum() == rule.sum()  # every rule position wins a slot at init
    out.loss.backward()
    assert model.router.rule_weight.grad is not None


@pytest.mark.parametrize("router", ROUTERS)
def test_bf16_autocast_trains_and_infers(router):
    model = build_model(tiny_config(router=router))
    idx, targets = make_targets(text_batch(2, 43), 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(idx, targets)
        causal = model(idx, routing="causal")
    out.loss.backward()
    assert torch.isfinite(out.loss) and causal.logits.dtype == torch.bfloat16


def test_calibrated_causal_routing_routes_about_capacity_before_the_aux_loss_learns():
    """With router_calibrate, causal routing thresholds at training's running top-k cut-off."""
    from pico.model import build_model
    from pico.model.config import ModelConfig

    cfg = ModelConfig(d_local=32, n_heads=2, n_kv_heads=1, window=16, n_in=1, n_out=1, d_latent=64, n_latent=1,
                      n_latent_heads=2, n_latent_kv_heads=1, n_predict=2, max_seq_len=128, capacity=0.25)
    torch.manual_seed(0)
    text = torch.tensor(list(b"the quick brown fox jumps over the lazy dog; " * 12)[:4 * 128]).view(4, 128)
    plain = build_model(ModelConfig(**{**cfg.__dict__, "router_calibrate": False}))
    calibrated = build_model(cfg)
    calibrated.load_state_dict(plain.state_dict(), strict=False)
    calibrated.train()
    for _ in range(3):  # training forwards update the cut-off; no optimizer step
        calibrated(text, routing="topk")
    calibrated.eval()
    before = calibrated.router.cutoff.clone()
    frac = calibrated(text, routing="causal").routed.float().mean().item()
    assert abs(frac - 0.25) < 0.08, frac
    assert torch.equal(calibrated.router.cutoff, before)  # eval forwards never move it
    # Uncalibrated, untrained: the score's sign decides, which routes an arbitrary share.
    assert "router.cutoff" in calibrated.state_dict() and "router.cutoff" not in plain.state_dict()


def test_no_zero_dim_parameters_for_any_router_option():
    """DeepSpeed flattens parameters through views that fail on 0-dim tensors (seen with router_prior)."""
    from pico.model import build_model
    from pico.model.config import ModelConfig

    base = dict(d_local=32, n_heads=2, n_kv_heads=1, window=16, n_in=1, n_out=1, d_latent=64, n_latent=1,
                n_latent_heads=2, n_latent_kv_heads=1, n_predict=2, max_seq_len=64)
    for extra in ({}, {"router_prior": 4.0}, {"router": "spacelike"}, {"router": "chunk"}, {"router": "entropy"},
                  {"router": "none", "n_latent": 0}):
        model = build_model(ModelConfig(**{**base, **extra}))
        assert all(p.dim() >= 1 for p in model.parameters()), extra
