"""Weighted mixtures (data.mix): byte shares follow the weights, exact resume, exact split across ranks."""

from __future__ import annotations

import json
import random

import pytest
import torch

from pico.configs.errors import ConfigError
from pico.configs.tree import load_config
from pico.pipeline.data.loader import ByteBatches, resolve_shards

from .test_loader import split_docs, take, write_dataset

T, EXTRA, B = 64, 2, 8


def source_docs(tag: int, n: int, seed: int) -> list[bytes]:
    """Documents whose every byte says which source they are from (tag), of mixed lengths."""
    rng = random.Random(seed)
    return [bytes([tag]) * rng.choice([10, 50, 200, 900]) for _ in range(n)]


@pytest.fixture
def sources(tmp_path):
    # web is large, code medium, books tiny (it must repeat its epochs while web goes on)
    out = []
    for name, tag, n, shards in (("web", 1, 400, 8), ("code", 2, 120, 4), ("books", 3, 8, 2)):
        root = write_dataset(tmp_path / name, {"train": split_docs(source_docs(tag, n, tag), shards)})
        out.append((name, resolve_shards([str(root)], "train")))
    return out


def shares(batches: list[torch.Tensor]) -> dict[int, float]:
    inputs = torch.cat([b[:, :T].reshape(-1) for b in batches])
    inputs = inputs[inputs < 256]  # EOS is no source's
    return {tag: float((inputs == tag).float().mean()) for tag in (1, 2, 3)}


def test_byte_shares_follow_the_weights_over_10_mb(sources):
    mix = [(name, shards, w) for (name, shards), w in zip(sources, (0.7, 0.2, 0.1))]
    loader = ByteBatches([], seq_len=T, batch_size=B, extra=EXTRA, seed=3, shuffle_buffer=16, mix=mix)
    batches = take(loader, 10_000_000 // (T * B) + 1)  # 10 MB of inputs
    got = shares(batches)
    for tag, w in zip((1, 2, 3), (0.7, 0.2, 0.1)):
        assert abs(got[tag] - w) < 0.01, got  # within 1 % of the weights (EOS bytes blur it slightly)
    stats = loader.stats["sources"]
    rows = {name: s["rows"] for name, s in stats.items()}
    total = sum(rows.values())
    assert all(abs(rows[n] / total - w) <= 1 / total for n, w in zip(("web", "code", "books"), (0.7, 0.2, 0.1)))
    assert stats["books"]["epoch"] > stats["web"]["epoch"] >= 1  # the small source repeats
    assert stats["web"]["bytes"] == rows["web"] * T
    # each row's source is reported for the last batch, and matches the row's bytes
    last = batches[-1]
    for row, src in zip(last, loader.row_sources):
        body = row[:T][row[:T] < 256]
        assert set(body.tolist()) <= {src + 1}


@pytest.mark.filterwarnings("ignore:.*loader workers")
def test_exact_resume_with_workers(sources):
    mix = [(name, shards, w) for (name, shards), w in zip(sources, (0.5, 0.3, 0.2))]
    kw = dict(seq_len=T, batch_size=B, extra=EXTRA, rank=1, world_size=2, seed=5, shuffle_buffer=4, worker_chunk=2,
              mix=mix, num_workers=2)
    first = ByteBatches([], **kw)
    it = iter(first)
    batches, states = [], []
    for _ in range(30):
        batches.append(next(it))
        states.append(json.loads(json.dumps(first.state_dict())))
    for n in (3, 4, 9):
        resumed = ByteBatches([], **kw)
        resumed.load_state_dict(states[n - 1])
        got = take(resumed, 30 - n)
        assert all(torch.equal(a, b) for a, b in zip(got, batches[n:])), f"resume after {n} batches"
        assert resumed.state_dict() == states[-1]
    other = ByteBatches([], **{**kw, "mix": [(n, s, 1.0) for n, s, _ in mix]})
    with pytest.raises(Exception, match="mix"):
        other.load_state_dict(states[0])


def test_ranks_split_each_source_without_overlap(sources):
    """Each rank reads its own slots of every source (the split within a source is the plain loader's)."""
    mix = [(name, shards, w) for (name, shards), w in zip(sources, (0.6, 0.3, 0.1))]
    seen, got = [], []
    for rank in (0, 1):
        loader = ByteBatches([], seq_len=T, batch_size=B, extra=EXTRA, rank=rank, world_size=2, seed=1, mix=mix)
        got.append(take(loader, 3))
        seen.append(loader.stats)
    # the ranks follow the same row schedule over their own slots of every source
    assert seen[0]["sources"] == seen[1]["sources"]
    assert seen[0]["documents"] > 0 and seen[1]["documents"] > 0
    assert not all(torch.equal(a, b) for a, b in zip(*got))


@pytest.mark.parametrize("mix, says", [
    ('[{name: a, paths: [x], weight: -1}]', r"data.mix\[0\].weight=-1.0 is negative"),
    ('[{name: a, paths: [x], weight: 0}]', "weights sum to 0"),
    ('[{name: a, paths: [], weight: 1}]', r"data.mix\[0\].paths is empty"),
    ('[{name: a, paths: [x]}, {name: a, paths: [y]}]', r"data.mix\[1\].name='a' is used twice"),
    ('[{name: a, paths: [x], wieght: 1}]', r"unknown key data.mix\[0\].wieght; valid keys of data.mix\[0\]: name, paths, weight"),
])
def test_bad_mixtures_are_config_errors(mix, says):
    with pytest.raises(ConfigError, match=says):
        load_config("configs/quickstart.yaml", ["--data.train=[]", f"--data.mix={mix}"])


def test_mix_beside_train_is_refused():
    with pytest.raises(ConfigError, match="data.train and data.mix are both set"):
        load_config("configs/quickstart.yaml", ["--data.train=[a]", "--data.mix=[{name: a, paths: [x]}]"])


def test_an_all_corrupt_source_is_named_with_skip_corrupt(sources, tmp_path):
    """Issue 28: with skip_corrupt, a source whose every shard is corrupt stopped the run without its name."""
    from pico.configs.errors import UserError

    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(2):
        (bad / f"train-00000{i}.tar").write_bytes(b"\x00garbage" * 200)
    mix = [("web", sources[0][1], 0.9), ("broken", sorted(str(p) for p in bad.iterdir()), 0.1)]
    loader = ByteBatches([], seq_len=T, batch_size=B, extra=EXTRA, seed=3, shuffle_buffer=16, mix=mix,
                         skip_corrupt=True)
    with pytest.raises(UserError, match=r"data.mix source 'broken': .*every sample it read was corrupt and skipped "
                                        r"\(data.skip_corrupt\), in train-00000[01].tar"):
        take(loader, 20)
