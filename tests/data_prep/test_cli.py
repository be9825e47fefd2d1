"""`pico prep` options: the short flags and the dotted keys of the prep section are one option each."""

from __future__ import annotations

import argparse

import pytest

from pico.configs.errors import UserError
from pico.data_prep.cli import add_arguments, check_dotted_keys
from pico.pipeline.cli import main


def parse(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    check_dotted_keys(argv)
    return vars(parser.parse_args(argv))


def test_dotted_keys_equal_short_flags():
    short = parse(["--input", "a", "b", "--output", "out", "--shard-bytes", "512M", "--val-fraction", "0.1",
                   "--dedup", "--zstd-level", "5", "--format", "jsonl", "--text-field", "body"])
    dotted = parse(["--prep.inputs", "a", "b", "--prep.output=out", "--prep.shard_bytes=512M", "--prep.val_fraction=0.1",
                    "--prep.dedup=true", "--prep.zstd_level=5", "--prep.format=jsonl", "--prep.text_field=body"])
    assert short == dotted
    assert dotted["shard_bytes"] == 512 << 20 and dotted["dedup"] is True and dotted["inputs"] == ["a", "b"]
    assert parse(["--input", "a", "--output", "o", "--prep.dedup=false"])["dedup"] is False
    assert parse(["--input", "a", "--output", "o"])["dedup"] is False


def test_unknown_or_foreign_dotted_key_names_the_valid_ones(capsys):
    with pytest.raises(UserError, match=r"prep\.shard_size.*valid keys of the prep section: .*shard_bytes"):
        check_dotted_keys(["--prep.shard_size=1M"])
    with pytest.raises(UserError, match=r"--train\.steps: `pico prep` takes only keys of its own section"):
        check_dotted_keys(["--train.steps=3"])
    assert main(["prep", "--input", "x", "--output", "y", "--prep.bogus=1"]) == 2
    assert "unknown key prep.bogus" in capsys.readouterr().err
