"""The config tree: every packaged YAML loads, overrides are strict, errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pico.configs.tree import Config, ConfigError, describe_config, load_config, parse_overrides, save_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert any(p.stem == "quickstart" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads_and_builds(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    from pico.model import build_model, param_count

    expected = param_count(cfg.model)
    if expected > 50_000_000:  # GPU-sized configs: validate and count, but do not allocate GBs in a unit test
        with torch.device("meta"):
            model = build_model(cfg.model)
    else:
        model = build_model(cfg.model)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_baselines_match_quickstart_compute():
    from pico.model import flops_per_byte

    pico = flops_per_byte(load_config("quickstart").model)
    for name in ("vanilla", "spacebyte"):
        ratio = flops_per_byte(load_config(name).model) / pico
        assert 0.95 <= ratio <= 1.05, (name, ratio)


def test_dotted_override_applies_and_types():
    cfg = load_config("quickstart", ["--optim.lr=3e-4", "--model.router=none", "--train.steps=7"])
    assert cfg.optim.lr == 3e-4 and cfg.model.router == "none" and cfg.train.steps == 7


def test_a_time_is_the_string_it_looks_like_not_a_base_60_number(tmp_path):
    """YAML 1.1 reads 48:00:00 as 172800, which Slurm would take as minutes (120 days)."""
    (tmp_path / "c.yaml").write_text("cluster:\n  time: 48:00:00\n")
    assert load_config(tmp_path / "c.yaml").cluster.time == "48:00:00"
    assert load_config("quickstart", ["--cluster.time=2:30:00"]).cluster.time == "2:30:00"
    assert load_config("quickstart", ["--train.steps=0x10", "--optim.lr=1e-3"]).train.steps == 16  # other numbers stay
    with pytest.raises(ConfigError, match="train.steps"):
        load_config("quickstart", ["--train.steps=1:30"])


def test_unknown_key_names_key_and_lists_valid_ones():
    with pytest.raises(ConfigError) as e:
        load_config("quickstart", ["--optim.learning_rate=1"])
    assert "optim.learning_rate" in str(e.value) and "lr" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config("quickstart", ["--modle.d_local=1"])
    assert "modle" in str(e.value) and "model" in str(e.value)


def test_bad_choice_lists_choices():
    from pico.pipeline.release.load import check_model_config  # routers need torch: checked after the tree loads

    with pytest.raises(ConfigError) as e:
        check_model_config(load_config("quickstart", ["--model.router=magic"]).model)
    msg = str(e.value)
    assert "model.router" in msg and "learned" in msg and "spacelike" in msg and "none" in msg


def test_bad_type_and_bad_value():
    with pytest.raises(ConfigError, match="train.steps"):
        load_config("quickstart", ["--train.steps=many"])
    with pytest.raises(ConfigError, match="n_kv_heads"):
        load_config("quickstart", ["--model.n_kv_heads=3"])
    with pytest.raises(ConfigError, match="zero_stage"):
        load_config("quickstart", ["--optim.name=soap", "--train.zero_stage=2"])


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["--optim.lr"])
    with pytest.raises(ConfigError, match="dotted"):
        parse_overrides(["--lr=1"])


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("quickstart", ["--model.capacity=0.25"])
    path = save_config(cfg, tmp_path)
    again = load_config(path)
    assert again == cfg


def test_help_config_documents_every_key():
    text = describe_config()
    for key in ("model.capacity", "optim.lr", "data.seq_len", "train.zero_stage", "checkpoint.keep_last",
                "logging.wandb_mode", "cluster.nodes"):
        assert key in text


@pytest.mark.parametrize("override", ["--optim.decay_fraction=20", "--optim.warmup_steps=-5", "--optim.shampoo_beta=1.5",
                                      "--optim.precondition_frequency=0", "--optim.max_precond_dim=0"])
def test_schedule_and_soap_settings_that_cannot_work_name_the_key(override):
    """decay_fraction=20 (a percent meant) once started the decay right after warmup, without a word."""
    with pytest.raises(ConfigError, match=override.split("=")[0].removeprefix("--").replace(".", r"\.")):
        load_config("quickstart", [override])
