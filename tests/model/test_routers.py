"""The router protocol and registry (model/routers/): names, options, retired options, older checkpoints."""

from __future__ import annotations

import pytest
import torch

from pico.configs.errors import ConfigError
from pico.configs.tree import from_dict, load_config
from pico.model import build_model
from pico.model.config import ModelConfig
from pico.model.pico import RENAMED, upgrade_state_dict
from pico.model.routers.base import ROUTERS, validate_config
from pico.pipeline.release.load import check_model_config

from .conftest import tiny_config


def test_every_router_file_is_registered_by_its_name():
    assert {"spacelike", "learned", "chunk", "entropy"} <= set(ROUTERS)
    for name, cls in ROUTERS.items():
        assert cls.name == name and cls.__module__ == f"pico.model.routers.{name}"


@pytest.mark.parametrize("override, key", [
    ("--model.router=magic", "model.router"),
    ("--model.router_prior=2", "model.router_prior"),      # a learned-router option on the rule
    ("--model.chunk_cap=0.5", "model.chunk_cap"),          # a chunk-router option on the rule
    ("--model.router_calibrate=false", "model.router_calibrate"),
])
def test_an_option_the_router_does_not_read_is_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        check_model_config(load_config("configs/quickstart.yaml", ["--model.router=spacelike", override]).model)
    msg = str(e.value)
    assert key in msg and "\n" not in msg


def test_options_at_their_defaults_pass_on_every_router():
    for name in [*ROUTERS, "none"]:
        validate_config(tiny_config(router=name, **({"n_latent": 0} if name == "none" else {})))


@pytest.mark.parametrize("key, kept, retired", [("router_gate", "sigmoid", "straight_through"),
                                                ("router_aux", "score", "predictor"),
                                                ("dechunk_skip", "identity", "linear")])
def test_retired_options_load_at_the_kept_value_and_name_the_key_otherwise(key, kept, retired):
    data = {"router": "learned", "dechunk": key == "dechunk_skip", key: kept}
    assert isinstance(from_dict(ModelConfig, data, "model"), ModelConfig)  # what every older checkpoint holds
    with pytest.raises(ConfigError, match=rf"model\.{key} is retired") as e:
        from_dict(ModelConfig, {**data, key: retired}, "model")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("over", [dict(router="learned"), dict(router="chunk", dechunk=True)], ids=str)
def test_a_state_dict_of_an_older_pico_loads_into_todays_names(over):
    """Before the latent stack and the return path became components, their parameters sat on Pico itself."""
    torch.manual_seed(0)
    model = build_model(tiny_config(**over))
    old = {}
    for k, v in model.state_dict().items():
        for before, now in RENAMED.items():
            if k.startswith(now):
                k = before + k[len(now):]
        old[k] = v.clone()
    assert "latent_in.weight" in old and not any(k.startswith("latent.") for k in old)
    fresh = build_model(tiny_config(**over))
    fresh.load_state_dict(old, strict=True)  # the load hook maps the names
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert set(upgrade_state_dict(dict(old))) == set(model.state_dict())
