"""The optimizer plugin point: which optimizer, which groups decay, and the learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch

from pico.configs.tree import OptimConfig
from pico.pipeline.optim.build import build_optimizer, lr_at
from pico.pipeline.optim.soap import SOAP


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2, bias=False))
    model[0].bias.requires_grad_(False)  # frozen parameters are left out
    return model


@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("soap", SOAP)])
def test_build_optimizer_decays_only_matrices(name, cls):
    cfg = OptimConfig(name=name, lr=2e-3, betas=[0.9, 0.99], weight_decay=0.1)
    opt = build_optimizer(_model().named_parameters(), cfg)
    assert type(opt) is cls
    decay, no_decay = opt.param_groups
    assert decay["param_names"] == ["0.weight", "2.weight"] and decay["weight_decay"] == 0.1
    assert no_decay["param_names"] == ["1.weight", "1.bias"] and no_decay["weight_decay"] == 0.0
    assert decay["lr"] == 2e-3 and decay["betas"] == (0.9, 0.99)


def test_build_optimizer_accepts_plain_parameters_and_soap_fields():
    cfg = OptimConfig(name="soap", shampoo_beta=0.9, precondition_frequency=5, max_precond_dim=64,
                      merge_dims=True, precondition_1d=True)
    opt = build_optimizer(_model().parameters(), cfg)
    g = opt.param_groups[0]
    assert "param_names" not in g
    assert (g["shampoo_beta"], g["precondition_frequency"], g["max_precond_dim"]) == (0.9, 5, 64)
    assert g["merge_dims"] and g["precondition_1d"]


def test_build_optimizer_refuses_no_trainable_parameters():
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer([torch.zeros(3, requires_grad=False)], OptimConfig())


def _cfg(schedule: str) -> OptimConfig:
    return OptimConfig(lr=1.0, schedule=schedule, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)


def test_warmup_is_linear_and_trains_from_step_zero():
    for schedule in ("cosine", "wsd", "constant"):
        cfg = _cfg(schedule)
        assert lr_at(0, cfg, 110) == pytest.approx(0.1)
        assert lr_at(4, cfg, 110) == pytest.approx(0.5)
        assert lr_at(9, cfg, 110) == pytest.approx(1.0)


def test_cosine_key_steps():
    cfg = _cfg("cosine")
    assert lr_at(10, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.55)  # half way: (peak + floor) / 2
    assert lr_at(35, cfg, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)
    assert lr_at(500, cfg, 110) == pytest.approx(0.1)


def test_wsd_key_steps():
    cfg = _cfg("wsd")  # 100 steps: decay over the last 20
    assert lr_at(10, cfg, 100) == lr_at(79, cfg, 100) == 1.0
    assert lr_at(80, cfg, 100) == pytest.approx(1.0)
    assert lr_at(90, cfg, 100) == pytest.approx(0.55)
    assert lr_at(100, cfg, 100) == pytest.approx(0.1)


def test_constant_and_no_warmup():
    assert lr_at(10, _cfg("constant"), 100) == lr_at(10_000, _cfg("constant"), 100) == 1.0
    cfg = OptimConfig(lr=1.0, schedule="cosine", warmup_steps=0)
    assert lr_at(0, cfg, 100) == 1.0


@pytest.mark.parametrize("name", ["adamw", "soap"])
def test_stage_groups_carry_their_lr_scale(name):
    from pico.model import build_model
    from pico.pipeline.optim.build import set_lr
    from tests.model.conftest import tiny_config

    model = build_model(tiny_config(router="chunk", dechunk=True))
    cfg = OptimConfig(name=name, lr=1e-3, lr_scale_local=3.0, lr_scale_latent=1.0, lr_scale_router=0.5)
    opt = build_optimizer(model.named_parameters(), cfg)
    stages = {(g["pico_stage"], g["weight_decay"] > 0): g for g in opt.param_groups}
    assert set(stages) == {("local", True), ("local", False), ("latent", True), ("latent", False), ("router", True)}
    assert stages[("router", True)]["param_names"] == ["router.chunk.q_proj.weight", "router.chunk.k_proj.weight"]
    assert "return_path.residual.weight" in stages[("local", True)]["param_names"]
    assert all(n.startswith("latent.") for n in stages[("latent", True)]["param_names"])
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert stages[("local", True)]["lr"] == pytest.approx(3e-3)  # the scale holds from step 0
    set_lr(opt, 2e-3)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2e-3 * g["lr_scale"] for g in opt.param_groups])
    assert stages[("router", True)]["lr"] == pytest.approx(1e-3)
    # one step moves every stage, the SOAP sharding counts parameters across all groups
    idx, targets = model.make_targets(torch.randint(0, 256, (2, 40)))
    for _ in range(2):
        opt.zero_grad()
        model(idx, targets).loss.backward()
        opt.step()


def test_stage_scales_need_names():
    params = list(_model().parameters())
    with pytest.raises(ValueError, match="named_parameters"):
        build_optimizer(params, OptimConfig(lr_scale_router=2.0))
    assert len(build_optimizer(params, OptimConfig(lr_scale_local=2.0)).param_groups) == 2


def test_bad_lr_scale_is_a_config_error():
    from pico.configs.errors import ConfigError
    from pico.configs.tree import load_config

    with pytest.raises(ConfigError, match="optim.lr_scale_router"):
        load_config(None, ["--optim.lr_scale_router=0"])
