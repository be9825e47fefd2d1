"""Hashed n-gram embeddings (model/embedding.py) and pooled latent inputs (model/latent.py): what they
compute, their config errors, and their cost. Cached decoding of both is tested with every router in
test_generate.py (ROUTING_CASES)."""

from __future__ import annotations

import pytest
import torch

from pico.configs.errors import ConfigError
from pico.configs.tree import load_config
from pico.model import build_model, flops_per_byte, param_count
from pico.model.embedding import FILLER

from .conftest import tiny_config


def test_an_ngram_embedding_depends_on_its_last_n_bytes_only():
    model = build_model(tiny_config(router="none", ngram_orders=[3], ngram_buckets=97))
    ids = torch.tensor([list(b"xxabcyyabczzab")])
    e = model.ngrams(ids)[0]
    assert torch.equal(e[4], e[9])  # "abc" ends at 4 and at 9
    assert not torch.equal(e[3], e[8]) and not torch.equal(e[8], e[13])  # "xab", "yab", "zab": other rows
    assert not torch.equal(model.ngrams(torch.tensor([list(b"ab")]))[0, 1], e[3])  # FILLER + "ab" is not "xab"


def test_the_first_bytes_hash_the_filler_not_a_real_byte():
    model = build_model(tiny_config(router="none", ngram_orders=[2], ngram_buckets=4096))
    a = model.ngrams(torch.tensor([[ord("q"), ord("a")]]))[0, 1]  # "qa"
    b = model.ngrams(torch.tensor([[ord("a")]]))[0, 0]  # FILLER + "a"
    assert not torch.equal(a, b) and FILLER not in range(259)


def test_pooled_inputs_are_segment_means():
    torch.manual_seed(0)
    model = build_model(tiny_config(router="spacelike", pooled_inputs=True, capacity=0.5))
    ids = torch.tensor([list(b"ab cde f ghij k ")])
    x = torch.randn(1, ids.shape[1], model.cfg.d_local)
    r = model.router(x, ids, "causal")
    got = model.latent.inputs(x, r)
    routed = r.mask[0].nonzero().flatten().tolist()
    prev = -1
    for j, t in enumerate(routed):
        torch.testing.assert_close(got[0, j], x[0, prev + 1:t + 1].mean(0))
        prev = t
    assert routed == [2, 6, 8, 13, 15]


@pytest.mark.parametrize("override, key", [
    ("--model.ngram_orders=[1]", "model.ngram_orders"), ("--model.ngram_orders=[9]", "model.ngram_orders"),
    ("--model.ngram_orders=[3,3]", "model.ngram_orders"), ("--model.ngram_buckets=0", "model.ngram_buckets"),
])
def test_bad_ngram_options_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
        load_config("configs/quickstart.yaml", [override])
    assert "\n" not in str(e.value)


def test_pooled_inputs_need_a_router():
    with pytest.raises(ConfigError, match=r"model\.pooled_inputs") as e:
        load_config("configs/vanilla.yaml", ["--model.pooled_inputs=true"])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("over", [dict(router="none", ngram_orders=[2, 3], ngram_buckets=100),
                                  dict(router="spacelike", pooled_inputs=True),
                                  dict(router="chunk", pooled_inputs=True, ngram_orders=[4])], ids=str)
def test_parameters_and_flops_count_the_options(over):
    cfg = tiny_config(**over)
    assert param_count(cfg) == sum(p.numel() for p in build_model(cfg).parameters())
    plain = tiny_config(**{k: v for k, v in over.items() if k not in ("ngram_orders", "ngram_buckets", "pooled_inputs")})
    assert flops_per_byte(cfg) > flops_per_byte(plain)
    assert flops_per_byte(cfg) < 1.01 * flops_per_byte(plain)  # a lookup and a few additions per byte
