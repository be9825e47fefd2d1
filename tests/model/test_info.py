"""`pico info`: the counts it prints are the model's own."""

from __future__ import annotations

import json

from pico.model import flops_per_byte, param_count
from pico.pipeline.cli import main
from pico.configs.tree import load_config


def test_info_prints_params_and_flops_with_overrides(capsys):
    assert main(["info", "--config", "quickstart", "--model.router=none", "--model.window=256", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    cfg = load_config("quickstart", ["--model.router=none", "--model.window=256"]).model
    assert info["router"] == "none"
    assert info["params"] == param_count(cfg)
    assert info["train_flops_per_byte"] == flops_per_byte(cfg) == 3 * info["inference_flops_per_byte"]


def test_info_table_and_bad_key(capsys):
    assert main(["info", "--config", "quickstart"]) == 0
    assert "training FLOPs / byte" in capsys.readouterr().out
    assert main(["info", "--model.capacityy=0.3"]) == 2
    assert "capacity" in capsys.readouterr().err


def test_chunk_router_shows_its_cost_at_the_cap_too(capsys):
    assert main(["info", "--config", "quickstart", "--model.router=chunk", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    cfg = load_config("quickstart", ["--model.router=chunk"]).model
    assert info["train_flops_per_byte"] == flops_per_byte(cfg) < info["train_flops_per_byte_at_cap"]
    assert info["train_flops_per_byte_at_cap"] == flops_per_byte(cfg, rate=2 * cfg.capacity)  # chunk_cap 0: 2 x capacity
    assert main(["info", "--config", "quickstart", "--model.router=chunk"]) == 0
    assert "at the routing cap" in capsys.readouterr().out
