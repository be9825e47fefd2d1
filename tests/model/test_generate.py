"""Incremental decoding against the full forward pass (within and past the training length),
self-speculative decoding against plain decoding (greedy: byte for byte; sampling: in
distribution), caches. The CLI is tested in tests/pipeline/commands/test_generate.py."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch.testing import assert_close

from pico.model import EOS, build_model, make_targets
from pico.model.attention import attention_bias
from pico.model.generate import (START, Decoder, DraftTree, Sampler, acceptance_rates, auto_tree,
                                 expected_bytes_per_pass, generate)
from pico.model.latent import dechunk
from pico.model.routers.base import ROUTERS as REGISTERED
from pico.model.routers.base import pack_slots
from pico.model.routers.chunk import chunk_rate
from pico.model.spacelike import spacelike_boundaries

from .conftest import route_about_half, tiny_config

ROUTERS = ["learned", "spacelike", "none", "chunk", "entropy"]


def tiny(router: str = "learned", **over):
    model = build_model(tiny_config(router=router, **over)).eval()
    with torch.no_grad():
        if router == "learned":  # route about half the positions causally, so both paths run
            model.router.score.bias.fill_(0.2)
        if router == "chunk":  # W_q != W_k: boundaries on a random model at a rate near 0.3, not only where x turns
            model.router.chunk.q_proj.weight.add_(0.6 * torch.randn_like(model.router.chunk.q_proj.weight))
        if model.cfg.dechunk:  # the residual starts at zero; a random one shows it is applied
            model.return_path.residual.weight.normal_(0.0, 0.05)
    if router == "entropy":  # a random early head: a cut-off that routes about half the bytes
        route_about_half(model, texty(2, 64, seed=7))
    return model


def texty(B: int, T: int, seed: int = 0) -> torch.Tensor:
    """Bytes with words and spaces (so the spacelike rule fires), starting with START."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(ord("a"), ord("z") + 1, (B, T), generator=g)
    ids[torch.rand(B, T, generator=g) < 0.2] = ord(" ")
    ids[:, 0] = START
    return ids


# Every way a position can be routed causally: the router options change the decision rule.
# Every router x return path, and the options that change a router's causal decision rule.
ROUTING_CASES = [(r, {"dechunk": d}) for r in sorted(REGISTERED) for d in (False, True)] + [
    ("none", {}), ("learned", {"router_prior": 2.0}), ("learned", {"router_calibrate": False}),
    ("spacelike", {"return_init": 0.25}), ("none", {"ngram_orders": [2, 4]}), ("spacelike", {"ngram_orders": [3]}),
    ("spacelike", {"pooled_inputs": True}), ("learned", {"pooled_inputs": True}),
    ("chunk", {"pooled_inputs": True, "dechunk": True}), ("entropy", {"pooled_inputs": True, "ngram_orders": [2]})]


def test_routing_cases_cover_every_registered_router():
    assert {r for r, _ in ROUTING_CASES} == set(REGISTERED) | {"none"}


def sliding_cap(cand: torch.Tensor, cap: int, context: int) -> torch.Tensor:
    """Candidates (B, T) routed when fewer than cap were routed in the context - 1 bytes before."""
    mask = torch.zeros_like(cand)
    for t in range(cand.shape[1]):
        mask[:, t] = cand[:, t] & (mask[:, max(0, t - context + 1):t].sum(1) < cap)
    return mask


@torch.no_grad()
def windowed_forward(model, ids: torch.Tensor, context: int) -> torch.Tensor:
    """Reference head-1 logits (B, T, V) of the streaming rule, T unbounded: the full forward
    pass with causal routing, every attention cut to the last `context` bytes (local: also the
    window; latent: the routed positions among them), the spacelike and chunk caps sliding ones and
    dechunking's EMA running over every chunk since the start."""
    cfg, (B, T) = model.cfg, ids.shape
    pos = torch.arange(T)
    x = model.embed(ids) + (model.ngrams(ids) if model.ngrams is not None else 0)
    bias = attention_bias(pos, pos, model.local_slopes, min(cfg.window, context))
    for blk in model.blocks_in:
        x = blk(x, bias)
    if cfg.router != "none":
        rule = spacelike_boundaries(ids)
        if cfg.router == "spacelike":
            mask = sliding_cap(rule, math.ceil(round(cfg.capacity * context, 6)), context)
            gate, prob = torch.ones(B, T), None
        elif cfg.router == "chunk":
            prob = model.router.chunk(x)
            mask = sliding_cap(prob >= 0.5, math.ceil(round(chunk_rate(cfg) * context, 6)), context)
            gate = prob
        elif cfg.router == "entropy":
            mask, gate, prob = model.router.entropy(x)[1] > model.router.cutoff, torch.ones(B, T), None
        else:
            scores, causal = model.router.logits(x, rule)
            mask, gate, prob = causal > 0, torch.sigmoid(scores), torch.sigmoid(scores)
        idx, spos, ok = pack_slots(mask, max(int(mask.sum(1).max()), 1))
        g = idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        lat = model.latent
        inp = torch.gather(x, 1, g)
        if cfg.pooled_inputs:  # the mean of x over (previous routed position, this one], from prefix sums
            cs = torch.cat([x.new_zeros(B, 1, x.shape[-1]), x.cumsum(1)], 1)
            prev = torch.cat([torch.full_like(idx[:, :1], -1), idx[:, :-1]], 1)
            at = lambda i: cs.gather(1, (i + 1).clamp(min=0).unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # noqa: E731
            inp = (at(idx) - at(prev)) / (idx - prev).clamp(min=1).unsqueeze(-1)
        z = lat.proj_in(inp)
        lbias = attention_bias(spos, spos, lat.latent_slopes, context)
        for blk in lat.blocks:
            z = blk(z, lbias)
        y = lat.proj_out(lat.norm(z))
        if cfg.dechunk:
            x = x + (model.return_path.residual(x) + dechunk(y, idx, ok, mask, prob))
        else:
            x = x.scatter_add(1, g, y * (gate.gather(1, idx) * ok).unsqueeze(-1))
    for blk in model.blocks_out:
        x = blk(x, bias)
    return model.head_logits(x, 1)


@pytest.mark.parametrize("router,options", ROUTING_CASES, ids=lambda c: str(c))
def test_windowed_reference_is_the_full_forward_within_the_training_length(router, options):
    model = tiny(router, **options)
    ids = texty(2, 64)
    assert_close(windowed_forward(model, ids, 64), model(ids, routing="causal").logits, atol=2e-5, rtol=1e-4)


STREAMS = {"within max_seq_len": (40, None), "past max_seq_len": (150, None), "context 24 < max_seq_len": (90, 24)}


@pytest.mark.parametrize("stream", STREAMS, ids=str)
@pytest.mark.parametrize("router,options", ROUTING_CASES, ids=lambda c: str(c))
def test_cached_logits_equal_the_full_forward_at_every_step(router, options, stream):
    """Chunks of 1-4 bytes, a padded prefill and rows committing different amounts, past the
    window and past max_seq_len (64): against the full forward limited to the same context."""
    model = tiny(router, window=6, **options)
    B, (T, context) = 3, STREAMS[stream]
    ids = texty(B, T)
    full = windowed_forward(model, ids, context or model.cfg.max_seq_len)  # (B, T, V)
    if T <= model.cfg.max_seq_len:
        assert_close(full, model(ids, routing="causal").logits, atol=2e-5, rtol=1e-4)
    dec = Decoder(model, B, context)
    n0 = torch.tensor([5, 1, 3])  # prefill: prompts of different lengths, padded
    x = dec.forward(ids[:, :5], n0)
    for b in range(B):
        assert_close(model.head_logits(x, 1)[b, : n0[b]], full[b, : n0[b]], atol=2e-5, rtol=1e-4)
    dec.commit(n0)
    g = torch.Generator().manual_seed(1)
    done = n0.clone()
    while int(done.max()) <= T - 5:  # every row has C more bytes
        C = int(torch.randint(1, 5, (), generator=g))
        chunk = torch.stack([ids[b, done[b]: done[b] + C] for b in range(B)])
        lg = model.head_logits(dec.forward(chunk), 1)
        for b in range(B):
            assert_close(lg[b], full[b, done[b]: done[b] + C], atol=2e-5, rtol=1e-4)
        keep = torch.randint(1, C + 1, (B,), generator=g)  # like accepted drafts: a prefix of each chunk
        dec.commit(keep)
        done += keep


@pytest.mark.parametrize("router,options", ROUTING_CASES, ids=lambda c: str(c))
def test_every_path_of_a_draft_tree_computes_what_its_chain_would(router, options):
    """Tree chunk past the context: node logits == the window-limited full forward of prefix + path;
    after committing one path, decoding goes on as if that path had been fed as a chain."""
    model = tiny(router, window=6, max_seq_len=32, **options)
    tree = DraftTree.product([3, 2, 2])
    B, T0 = 2, 40
    ids = texty(B, T0 + 30, seed=4)
    g = torch.Generator().manual_seed(2)
    dec = Decoder(model, B)
    dec.forward(ids[:, :T0])
    dec.commit(torch.tensor([T0, T0]))
    nodes = torch.randint(ord("a"), ord("z") + 1, (B, len(tree)), generator=g)
    nodes[nodes < ord("f")] = ord(" ")  # spaces, so that nodes route
    nodes[:, 0] = ids[:, T0]
    lg = model.head_logits(dec.forward(nodes, tree=tree), 1)
    for i in range(len(tree)):
        path = tree.anc[i].nonzero().flatten()  # ancestors in index order = depth order
        seq = torch.cat([ids[:, :T0], nodes[:, path]], 1)
        assert_close(lg[:, i], windowed_forward(model, seq, 32)[:, -1], atol=2e-5, rtol=1e-4)
    best = torch.tensor([len(tree) - 1, 3])
    dec.commit_path(tree.anc[best], best)
    kept = [nodes[b, tree.anc[best[b]]] for b in range(B)]
    assert dec.length.tolist() == [T0 + len(k) for k in kept]
    nxt = torch.stack([torch.tensor([ord("q"), ord(" ")])] * B)
    lg = model.head_logits(dec.forward(nxt), 1)
    for b in range(B):
        seq = torch.cat([ids[b, :T0], kept[b], nxt[b]]).unsqueeze(0)
        assert_close(lg[b], windowed_forward(model, seq, 32)[0, -2:], atol=2e-5, rtol=1e-4)


def test_draft_trees_are_checked():
    assert len(DraftTree.product([3, 2, 1])) == 1 + 3 + 6 + 6
    t = DraftTree.from_accuracy([[0.5, 0.2, 0.1], [0.4, 0.1], [0.3]], 5)
    assert t.paths == [(0,), (0, 0), (1,), (2,), (1, 0)]  # path scores 0.5, 0.2, 0.2, 0.1, 0.08
    for bad in ([(0, 0)], [(0,), (0,)], [()], [(-1,)]):
        with pytest.raises(ValueError, match="draft tree"):
            DraftTree(bad)
    with pytest.raises(ValueError, match="at most 64"):
        DraftTree.product([8, 8])
    with pytest.raises(ValueError, match="needs n_predict >= 4"):
        generate(tiny("none", n_predict=3), [b"a"], 4, tree=DraftTree.product([1, 1, 1]))


@pytest.mark.parametrize("router", ROUTERS)
def test_rollback_leaves_the_cache_of_the_accepted_bytes_only(router):
    """A chunk of 4 with 2 kept = feeding those 2 alone; entries already stored are untouched."""
    model = tiny(router, window=6)
    ids = texty(2, 24, seed=3)
    spec, ref = Decoder(model, 2), Decoder(model, 2)
    for d in (spec, ref):
        d.forward(ids[:, :17])
        d.commit(torch.tensor([17, 17]))
    before = [t.clone() for t in spec.local.k]
    drafts = ids[:, 17:21].clone()
    drafts[:, 2:] = ord("#")  # wrong drafts: rejected below
    spec.forward(drafts)
    spec.commit(torch.tensor([2, 2]))
    ref.forward(ids[:, 17:19])
    ref.commit(torch.tensor([2, 2]))
    for a, b in [(spec.local, ref.local)] + ([(spec.latent, ref.latent)] if spec.latent else []):
        ring = a.pos[:, : a.S + 1]  # the staging slots after the scratch slot hold the last step's chunk
        assert torch.equal(ring, b.pos[:, : b.S + 1])
        for ka, kb, va, vb in zip(a.k, b.k, a.v, b.v):
            live = (ring != (1 << 40)).view(ring.shape[0], 1, -1, 1).expand_as(ka)
            assert_close(ka[live], kb[live], atol=1e-6, rtol=1e-5)
            assert_close(va[live], vb[live], atol=1e-6, rtol=1e-5)
    # live slots the 2 kept bytes did not overwrite (the scratch slot absorbs the rejected ones, unseen)
    ring = spec.local.pos[:, : spec.local.S + 1]
    unchanged = ~torch.isin(ring, torch.arange(17, 19)) & (ring != (1 << 40))
    for k0, k1 in zip(before, spec.local.k):
        m = unchanged.view(2, 1, -1, 1).expand_as(k0)
        assert torch.equal(k0[m], k1[m])
    assert torch.equal(spec.length, ref.length) and torch.equal(spec.prev, ref.prev)


@pytest.mark.parametrize("router", ROUTERS)
def test_cache_memory_per_sequence_is_constant_in_the_generated_length(router):
    """Cache bytes after N and 3N decoded bytes (N > max_seq_len) are equal; the rings hold the
    last window - 1 positions (local) and only routed positions of the last context - 1 (latent)."""
    model = tiny(router, window=8, max_seq_len=32)
    dec = Decoder(model, 2)
    N = 40
    ids = texty(2, 3 * N)
    sizes = []
    for t in range(3 * N):
        dec.forward(ids[:, t:t + 1])
        dec.commit(torch.tensor([1, 1]))
        sizes.append(dec.nbytes())
    assert sizes[N - 1] == sizes[3 * N - 1] and len(set(sizes)) == 1
    assert dec.local.S == 7  # window - 1 slots
    live = dec.local.pos[:, : dec.local.S]
    assert torch.equal(live.sort(1).values, torch.arange(3 * N - 7, 3 * N).expand(2, -1))  # the last window-1
    if dec.latent is not None:
        assert dec.latent.S == 31  # context - 1 slots
        seen = dec.latent.pos[:, : dec.latent.S]
        recent = seen[(seen >= 3 * N - 31) & (seen < 1 << 40)]
        assert recent.numel() > 0  # routed positions of the last context bytes are there
    out = generate(model, [b"ab", b""], 3 * N, stop_at_eos=False)
    assert out.cache_bytes == dec.nbytes() // 2 and [len(o) for o in out.outputs] == [3 * N, 3 * N]


def test_long_prompts_are_cut_to_the_context_and_reported():
    model = tiny("learned", max_seq_len=32)
    prompt = bytes(texty(1, 200, seed=5)[0, 1:].tolist())  # 199 bytes
    res = generate(model, [prompt, b"ab"], 50, stop_at_eos=False)
    assert res.prompt_bytes_outside == [199 - 32, 0] and res.context == 32
    # what was cut does not matter: the kept tail alone gives the same continuation
    tail = generate(model, [prompt[-32:]], 50, stop_at_eos=False)
    assert tail.outputs[0] == res.outputs[0] and tail.prompt_bytes_outside == [0]
    assert generate(model, [prompt[-31:]], 5).prompt_bytes_outside == [0]  # START + 31 bytes fit exactly


@pytest.mark.parametrize("router", ROUTERS)
def test_greedy_speculative_equals_greedy_plain_on_random_models(router):
    model = tiny(router, n_predict=4)
    prompts = [b"", b"a", b"hello world", b"x" * 30, bytes(range(200, 240)), b"the cat sat on the mat. "]
    plain = generate(model, prompts, 50, speculative=False)
    spec = generate(model, prompts, 50, speculative=True)
    assert spec.outputs == plain.outputs
    assert plain.bytes_per_pass <= 1.0  # one byte per pass (the pass that yields EOS adds none)
    # one at a time too: batching must not change anything
    assert [generate(model, [p], 50).outputs[0] for p in prompts[:3]] == plain.outputs[:3]


TEXT = b"the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs! "


@pytest.fixture(scope="module")
def trained():
    """A tiny model trained briefly on repeated text, so that its draft heads are mostly right."""
    torch.manual_seed(0)
    model = build_model(tiny_config(n_predict=4, window=16, max_seq_len=96, capacity=0.3))
    stream = torch.tensor(list(TEXT * 40))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        start = torch.randint(0, len(stream) - 100, (8,))
        idx, tgt = make_targets(torch.stack([stream[s:s + 96 + 4] for s in start.tolist()]), 4)
        loss = model(idx, tgt).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_drafts_cut_by_confidence_keep_greedy_output_and_shorten_the_chunk(trained):
    prompts = [TEXT[:10], b"zzz qqq", TEXT[40:52]]
    plain = generate(trained, prompts, 100, speculative=False, stop_at_eos=False)
    full = generate(trained, prompts, 100, stop_at_eos=False, draft_confidence=0.0)
    cut = generate(trained, prompts, 100, stop_at_eos=False, draft_confidence=0.99)
    assert cut.outputs == plain.outputs == full.outputs
    alone = [generate(trained, [p], 100, stop_at_eos=False, draft_confidence=0.99) for p in prompts]
    assert [a.outputs[0] for a in alone] == plain.outputs
    assert 1.0 < sum(a.bytes_per_pass for a in alone) / 3 < full.bytes_per_pass  # fewer drafts fed, fewer accepted
    with pytest.raises(ValueError, match="draft_confidence"):
        generate(trained, prompts, 10, draft_confidence=1.0)


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy_latent"])
def test_greedy_speculative_equals_greedy_plain_when_drafts_are_accepted(trained, lazy):
    prompts = [TEXT[i:i + n] for i, n in [(0, 10), (5, 30), (17, 3), (40, 45), (60, 1)]] + [b"", b"zzz qqq"]
    plain = generate(trained, prompts, 60, speculative=False)
    spec = generate(trained, prompts, 60, speculative=True, lazy_latent=lazy)
    assert spec.outputs == plain.outputs
    assert spec.bytes_per_pass > 2.0  # drafts are accepted: this exercises multi-byte steps
    assert spec.forward_passes < plain.forward_passes / 2
    assert spec.routing_agreement is not None and 0.0 <= spec.routing_agreement <= 1.0
    assert all(s in ("eos", "max_bytes") for s in spec.stopped)


def test_greedy_speculative_equals_greedy_plain_past_max_seq_len(trained):
    """Outputs of 3 x max_seq_len (96) bytes, from a short prompt and from one longer than the context."""
    prompts = [TEXT[:12], TEXT * 2, b"zzz qqq"]
    plain = generate(trained, prompts, 288, speculative=False, stop_at_eos=False)
    spec = generate(trained, prompts, 288, speculative=True, stop_at_eos=False)
    assert [len(o) for o in plain.outputs] == [288] * 3
    assert spec.outputs == plain.outputs
    assert spec.bytes_per_pass > 2.0 and spec.prompt_bytes_outside == [0, 2 * len(TEXT) - 96, 0]


def _exact_joint(model, sampler: Sampler, n: int) -> dict[tuple[int, ...], float]:
    """P(first n generated ids) under plain sampling, by enumerating the support with full forwards."""
    dist = {(): 1.0}
    with torch.inference_mode():
        for _ in range(n):
            keys = list(dist)
            p = sampler.probs(model(torch.tensor([[START, *k] for k in keys]), routing="causal").logits[:, -1])
            dist = {k + (b,): dist[k] * p[r, b].item() for r, k in enumerate(keys)
                    for b in (p[r] > 0).nonzero().flatten().tolist()}
    return dist


def _chi_square(counts: Counter, dist: dict, N: int) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom; outcomes expected < 5 times are pooled."""
    stat, dof, pool_exp, pool_obs = 0.0, -1, 0.0, 0
    for k, p in dist.items():
        if N * p >= 5:
            stat += (counts.get(k, 0) - N * p) ** 2 / (N * p)
            dof += 1
        else:
            pool_exp += N * p
            pool_obs += counts.get(k, 0)
    pool_obs += sum(v for k, v in counts.items() if k not in dist)
    return stat + (pool_obs - pool_exp) ** 2 / max(pool_exp, 1e-9), dof + 1


SAMPLED_TREES = {"chain": None, "chain cut by confidence": "cut", "product 3,2": [3, 2], "from_accuracy": "acc"}


@pytest.mark.parametrize("tree", SAMPLED_TREES, ids=str)
def test_speculative_sampling_has_plain_sampling_distribution(tree):
    """First 3 bytes of 6000 speculative samples vs the exact distribution of plain sampling, with a
    chain of drafts and with draft trees (recursive rejection sampling over each node's children).

    The model is made to have a few likely bytes (a large unembedding, top-p 0.9) and draft
    heads that differ from head 1, so drafts are accepted about half the time and the residual
    resampling runs. Resampling from p instead of max(0, p - q) fails this test."""
    torch.manual_seed(0)
    model = build_model(tiny_config(n_predict=3)).eval()
    with torch.no_grad():
        model.embed.weight.copy_(model.embed.weight[0] + 0.05 * model.embed.weight)  # contexts look alike
        model.unembed.weight.mul_(35)
        for h in model.mtp_heads:
            h.mlp.down.weight.mul_(20)
    N = 6000
    dist = _exact_joint(model, Sampler(1.0, 0.9, 0, False, "cpu"), 3)
    tree = SAMPLED_TREES[tree]
    cut = 0.3 if tree == "cut" else 0.0  # drafts after the running top probability falls below 0.3 are not fed
    tree = None if tree in (None, "cut") else DraftTree.product(tree) if tree != "acc" else \
        DraftTree.from_accuracy([[0.5, 0.3, 0.1], [0.4, 0.2]], 6)  # (0,) (1,) (0,0) (2,) (1,0) (0,1)
    res = generate(model, [b""] * N, 3, speculative=True, temperature=1.0, top_p=0.9, seed=1, stop_at_eos=False,
                   tree=tree, draft_confidence=cut)
    assert res.bytes_per_pass > 1.2  # drafts were accepted ...
    assert res.forward_passes == 3  # ... and rejected: some sequences needed a third pass
    stat, dof = _chi_square(Counter(tuple(o) for o in res.outputs), dist, N)
    assert stat < dof + 4 * (2 * dof) ** 0.5, (stat, dof)  # about p < 0.001


@pytest.mark.parametrize("n_exact", [1, 2])
def test_a_cut_chain_keeps_the_sampling_distribution(n_exact):
    """Lazy passes can read only the first n_exact logits: the byte after the accepted drafts
    (the last testable draft when all pass, else the residual sample) must still follow p."""
    g = torch.Generator().manual_seed(0)
    N, k, V = 40000, 3, 259
    sampler = Sampler(1.0, 1.0, 3, False, "cpu")
    base = torch.full((V,), -30.0)
    base[[97, 98, 99, 100]] = torch.tensor([2.0, 1.0, 0.5, 0.0])
    logits = (base + torch.randn(k + 1, V, generator=g).clamp(-1, 1)).expand(N, -1, -1)  # (N, 1 + k, V)
    dq = base.clone()
    dq[[97, 98, 99, 100]] = torch.tensor([0.0, 1.5, 0.0, 1.0])
    q = torch.softmax(dq, -1).expand(N, k, V)
    drafts = torch.multinomial(q.reshape(-1, V), 1, generator=g).view(N, k)
    chunk = torch.cat([torch.full((N, 1), 97), drafts], 1)
    m, nxt = sampler.verify(logits, chunk, q, torch.full((N,), n_exact))
    assert int(m.max()) <= n_exact - 1
    p = torch.softmax(logits[0, n_exact - 1], -1)  # the byte at index n_exact follows head 1 there
    last = m == n_exact - 1  # rows that accepted every testable draft before the last byte
    got = torch.bincount(nxt[last], minlength=V).float()
    want = p * last.sum()
    keep = want > 5
    stat = ((got[keep] - want[keep]) ** 2 / want[keep]).sum().item()
    assert stat < int(keep.sum()) + 4 * (2 * int(keep.sum())) ** 0.5, stat


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy_latent"])
def test_greedy_speculative_equals_greedy_plain_one_prompt_at_a_time(trained, lazy):
    """Batch 1 is where lazy passes happen (a batch skips the latent stack only when no row routes)."""
    for prompt in [TEXT[:10], TEXT[17:20], b"zzz qqq", b""]:
        plain = generate(trained, [prompt], 120, speculative=False, stop_at_eos=False)
        spec = generate(trained, [prompt], 120, lazy_latent=lazy, stop_at_eos=False)
        assert spec.outputs == plain.outputs and spec.bytes_per_pass > 1.5


def test_greedy_tree_decoding_equals_greedy_plain(trained):
    """A tree verifies several candidates per head in one pass; greedy output stays head-1 greedy."""
    prompts = [TEXT[:10], TEXT[17:20], b"zzz qqq", b"", TEXT * 2]
    plain = generate(trained, prompts, 150, speculative=False, stop_at_eos=False)
    chain = generate(trained, prompts, 150, stop_at_eos=False)
    for tree in (DraftTree.product([2, 2, 1]), DraftTree.from_accuracy([[0.6, 0.2, 0.1], [0.5, 0.2], [0.4, 0.2]], 12)):
        spec = generate(trained, prompts, 150, tree=tree, stop_at_eos=False)
        assert spec.outputs == plain.outputs and spec.bytes_per_pass >= chain.bytes_per_pass - 0.05
        one = [generate(trained, [p], 150, tree=tree, stop_at_eos=False).outputs[0] for p in prompts[:2]]
        assert one == plain.outputs[:2]
    tree = DraftTree.product([2, 2, 1])
    sampled = generate(trained, prompts, 150, tree=tree, temperature=0.7, top_p=0.95, seed=0, stop_at_eos=False)
    assert sampled.outputs == generate(trained, prompts, 150, tree=tree, temperature=0.7, top_p=0.95, seed=0,
                                       stop_at_eos=False).outputs  # a seed fixes the sampled tree's draws too
    assert sampled.bytes_per_pass > 2.0


def test_sampled_trees_need_children_that_are_draws_in_order(trained):
    """Rank r under sampling is the r-th draw without replacement: children (0,) and (2,) without (1,)
    would test the third draw as if it were the second, which is not exact."""
    gappy = DraftTree([(0,), (2,)])
    assert not gappy.sampling_ok and DraftTree.product([3, 2]).sampling_ok
    assert generate(trained, [b"ab"], 10, tree=gappy).n_bytes == 10  # greedy reads ranks as top-k: fine
    with pytest.raises(ValueError, match="ranks 0..k-1"):
        generate(trained, [b"ab"], 10, tree=gappy, temperature=0.8)


def _tree_first_bytes(best, chunk, nxt, tree, depth):
    """The byte at `depth` (1-based) after the root of each row's output: the accepted node there,
    or the drawn byte after the path when the path is shorter; -1 past that."""
    d = tree.depth[best]
    node = tree.anc[best] & (tree.depth == depth)  # (B, C): the path's node at that depth
    at = torch.where(node.any(1), chunk.gather(1, node.float().argmax(1, keepdim=True)).squeeze(1), -1)
    return torch.where(d >= depth, at, torch.where(d == depth - 1, nxt, -1))


def test_tree_verification_keeps_each_nodes_distribution():
    """One tree pass on synthetic distributions, 40000 rows: the first byte follows head 1 at the root,
    and given a first byte a accepted from the tree, the second follows head 1 at that node. Children
    are the draws 0..2 without replacement of a draft q far from p, so second and third children are
    accepted and the residuals matter. The two classic mistakes fail it (checked by editing the rule):
    keeping q_d after removing a rejected draw (the rule for draws with replacement) and retrying
    with p unchanged instead of max(0, p - q)."""
    N, V = 40000, 259
    tree = DraftTree.product([3, 2])
    sampler = Sampler(1.0, 1.0, 5, False, "cpu")
    likely = torch.tensor([97, 98, 99, 100, 101])

    def logits_after(b: torch.Tensor) -> torch.Tensor:  # head 1 at a node whose byte is b (..,) -> (.., V)
        out = torch.full((*b.shape, V), -30.0)
        out[..., likely] = torch.stack([(b * k % 7).float() / 3 for k in (1, 2, 3, 5, 6)], -1)
        return out

    dq = torch.full((2, V), -30.0)
    dq[:, likely] = torch.tensor([[3.0, 0.0, 2.0, 0.0, -1.0], [0.0, 2.5, 0.0, 1.0, 0.0]])
    q = torch.softmax(dq, -1).expand(N, 2, V)
    nodes = sampler.draw_tree(q, tree)  # (N, 9)
    chunk = torch.cat([torch.full((N, 1), 97), nodes], 1)
    logits = logits_after(chunk)  # (N, 10, V)
    best, path, nxt = sampler.verify_tree(logits, chunk, tree, q)
    first, second = (_tree_first_bytes(best, chunk, nxt, tree, d) for d in (1, 2))
    assert (tree.rank[best] == 2).any() and (tree.depth[best] == 2).any()  # third children and depth 2 accepted

    def chi2(got: torch.Tensor, p: torch.Tensor) -> tuple[float, int]:
        want = p * got.numel()
        keep = want > 5
        obs = torch.bincount(got, minlength=V).float()
        return ((obs[keep] - want[keep]) ** 2 / want[keep]).sum().item(), int(keep.sum())

    stat, dof = chi2(first, torch.softmax(logits_after(torch.tensor(97)), -1))
    for a in likely.tolist():
        rows = (first == a) & (tree.depth[best] >= 1)
        if int(rows.sum()) > 200:
            s2, d2 = chi2(second[rows], torch.softmax(logits_after(torch.tensor(a)), -1))
            stat, dof = stat + s2, dof + d2
    assert stat < dof + 4 * (2 * dof) ** 0.5, (stat, dof)  # about p < 0.001


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
def test_acceptance_rates_predict_the_chains_bytes_per_pass(trained, temperature):
    """Medusa's estimate from acceptance rates measured on the model's own continuations (one full
    forward each) against the bytes per pass that speculative decoding of other prompts then gets."""
    calib = [TEXT[i:i + 12] for i in (0, 30, 55)]
    texts = [p + o for p, o in zip(calib, generate(trained, calib, 80, temperature=temperature, top_p=0.95, seed=1,
                                                    stop_at_eos=False).outputs)]
    acc = acceptance_rates(trained, texts, temperature, 0.95, ranks=4)
    assert len(acc) == 3 and all(len(row) == 4 and 0.0 <= sum(row) <= 1.0 + 1e-9 for row in acc)
    run = generate(trained, [TEXT[10:20], TEXT[40:52]], 200, temperature=temperature, top_p=0.95, seed=2,
                   stop_at_eos=False, draft_confidence=0.0)  # the full chain the estimate is of
    expected = expected_bytes_per_pass(None, acc)
    assert run.bytes_per_pass > 1.5 and abs(expected - run.bytes_per_pass) < 0.25 * run.bytes_per_pass, (expected, run)
    a = acc  # the tree adds the rank-1 branch (1,), (1, 0), (1, 0, 0) to the chain
    assert expected_bytes_per_pass(DraftTree.product([2, 1, 1]), acc) == pytest.approx(
        expected + a[0][1] * (1 + a[1][0] + a[1][0] * a[2][0]))


def test_auto_tree_times_the_candidates_and_keeps_sampled_trees_exact(trained):
    calib = [TEXT[:12] + generate(trained, [TEXT[:12]], 100, temperature=0.8, seed=1).outputs[0]]
    choice = auto_tree(trained, calib, 0.8, 0.95, max_nodes=12, sizes=(6, 9, 12), repeats=1)
    assert [c["nodes"] for c in choice.candidates] == [3, 6, 9, 12] and choice.candidates[0]["chain"]
    assert all(c["ms_per_pass"] > 0 and c["expected_bytes_per_pass"] >= 1.0 for c in choice.candidates)
    trees = [c["ms_per_pass"] for c in choice.candidates[1:]]
    assert trees == sorted(trees)  # tree times are a fitted line, never falling with more nodes
    best = max(choice.candidates, key=lambda c: c["bytes_per_ms"])
    assert (choice.tree is None) == best["chain"]
    if choice.tree is not None:
        assert choice.tree.sampling_ok and len(choice.tree) - 1 == best["nodes"]
    # the chain is scored as it decodes: cut by draft_confidence, its passes carry fewer bytes than the full chain's
    greedy = [auto_tree(trained, calib, max_nodes=12, sizes=(6,), repeats=1, draft_confidence=c).candidates[0]
              for c in (0.0, 0.999)]
    assert greedy[0]["chain"] and greedy[1]["expected_bytes_per_pass"] < greedy[0]["expected_bytes_per_pass"]
    small = auto_tree(trained, calib, 0.8, 0.95, max_nodes=2, sizes=(2,), repeats=1)  # the 3-draft chain does not fit
    assert [c["nodes"] for c in small.candidates] == [2] and len(small.tree) - 1 == 2 and small.tree.sampling_ok


@pytest.mark.parametrize("scale", [0.1, 3.0], ids=["nucleus wider than the topk", "nucleus in the topk"])
def test_top_p_and_draws_follow_their_definitions(scale):
    """probs: softmax(logits / T) cut to the smallest sorted prefix with mass >= top_p (the topk shortcut
    and the full sort agree); _draw: index i with probability p_i / sum(p), never a zero entry."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 259, generator=g) * scale
    sampler = Sampler(0.8, 0.9, 0, True, "cpu")
    p = torch.softmax(sampler._mask(logits) / 0.8, -1)
    sp, order = p.sort(-1, descending=True)
    ref = torch.zeros_like(p).scatter(-1, order, sp.masked_fill(sp.cumsum(-1) - sp >= 0.9, 0.0))
    got = sampler.probs(logits)
    assert_close(got, ref / ref.sum(-1, keepdim=True))
    assert ((got > 0).sum(-1) > 32).any() == (scale < 1)  # both paths of probs ran
    N = 60000
    draws = sampler._draw(got[:1].expand(N, -1) * 3.0)  # unnormalised mass is fine
    counts = torch.bincount(draws, minlength=259).float()
    assert counts[got[0] == 0].sum() == 0
    want = got[0] * N
    keep = want > 5
    stat = ((counts[keep] - want[keep]) ** 2 / want[keep]).sum().item()
    assert stat < int(keep.sum()) + 4 * (2 * int(keep.sum())) ** 0.5, stat


@pytest.mark.parametrize("router", ["learned", "entropy"])
def test_generation_leaves_a_model_in_train_mode_as_it_was(router):
    """Reporting routing agreement ran a top-k forward; in train mode it moved the learned routers' running
    cut-off (a buffer every checkpoint keeps) toward the generated text."""
    model = tiny(router).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    generate(model, [b"hello world ", b"ab"], 20)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sampling_is_reproducible_with_a_seed():
    model = tiny("learned")
    a = generate(model, [b"ab", b""], 20, temperature=0.8, top_p=0.95, seed=7)
    b = generate(model, [b"ab", b""], 20, temperature=0.8, top_p=0.95, seed=7)
    assert a.outputs == b.outputs


def test_generation_stops_at_eos_and_goes_past_the_context():
    model = tiny("spacelike", max_seq_len=32)
    with torch.no_grad():  # make EOS the argmax everywhere
        model.unembed.weight[EOS] = model.unembed.weight.abs().max() * 50 * torch.sign(model.unembed.weight[EOS] + 1e-9)
    res = generate(model, [b"abc"], 10)
    assert res.outputs == [b""] or res.stopped == ["eos"]
    fresh = tiny("spacelike", max_seq_len=32)
    res = generate(fresh, [b"abcdefghij"], 100, stop_at_eos=False)
    assert len(res.outputs[0]) == 100 and res.stopped == ["max_bytes"]
    with pytest.raises(ValueError, match="context=1"):
        generate(fresh, [b"x"], 5, context=1)
