"""Outputs of tiny models for every routing case, saved to compare two revisions of model/ bit for bit.

    PYTHONPATH=<old checkout's pico tree> python benchmarks/refactor_identity.py save before.pt
    python benchmarks/refactor_identity.py save after.pt      # then torch.equal on every entry
(how issue 27's restructuring was checked; see benchmarks/results/restructure_27.md)."""
import sys, torch
from pico.model import build_model, make_targets, ModelConfig
from pico.model.generate import generate, DraftTree

CASES = [("learned", {}), ("spacelike", {}), ("none", {}), ("learned", {"router_prior": 2.0}),
         ("chunk", {}), ("chunk", {"dechunk": True}), ("spacelike", {"dechunk": True}), ("learned", {"dechunk": True}),
         ("learned", {"router_calibrate": False}), ("spacelike", {"return_init": 0.25, "dechunk": True})]

def cfg(router, **over):
    base = dict(d_local=32, n_heads=4, n_kv_heads=2, window=8, n_in=2, n_out=2, d_latent=64, n_latent=1,
                n_latent_heads=4, n_latent_kv_heads=2, capacity=0.25, n_predict=3, max_seq_len=64, router=router)
    base.update(over)
    return ModelConfig(**base)

def texty(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(ord("a"), ord("z") + 1, (B, T), generator=g)
    ids[torch.rand(B, T, generator=g) < 0.2] = ord(" ")
    ids[:, 0] = 257
    return ids

mode, path = sys.argv[1], sys.argv[2]
out = {}
for i, (router, over) in enumerate(CASES):
    torch.manual_seed(0)
    m = build_model(cfg(router, **over))
    with torch.no_grad():
        if router == "learned":
            m.router.score.bias.fill_(0.2)
        if router == "chunk":
            m.router.chunk.q_proj.weight.add_(0.6 * torch.randn_like(m.router.chunk.q_proj.weight))
    seq = texty(3, 40 + 3, seed=i)
    idx, tg = make_targets(seq, 3)
    m.train()
    o = m(idx, tg)
    o.loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.eval()
    with torch.no_grad():
        oc = m(idx, tg, routing="causal")
    g1 = generate(m, [b"the cat ", b"a"], 150, speculative=True, seed=1)
    g2 = generate(m, [b"the cat ", b"a"], 150, speculative=False, seed=1)
    g3 = generate(m, [b"the cat ", b"a"], 100, speculative=True, temperature=0.8, top_p=0.95, seed=3)
    g4 = generate(m, [b"the cat "], 100, tree=DraftTree.product([2, 2]), seed=1)
    out[i] = dict(sd={k: v.clone() for k, v in m.state_dict().items()}, loss=o.loss.detach(), logits=o.logits.detach(),
                  stats=o.stats, clogits=oc.logits, closs=oc.loss, cstats=oc.stats, grads=grads,
                  gen=[g1.outputs, g2.outputs, g3.outputs, g4.outputs], passes=[g1.forward_passes, g3.forward_passes, g4.forward_passes])
torch.save(out, path)
print("saved", len(out))
