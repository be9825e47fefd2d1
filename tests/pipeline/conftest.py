"""Fixtures shared by the pipeline tests (training runs need shards; several files train)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, corpus, ray_local):
    """Shards of ~1 MB of real novels, made by the real `pico prep` code path."""
    from pico.data_prep import prepare

    src = tmp_path_factory.mktemp("src")
    import zstandard

    for path in sorted((corpus / "novels").glob("*.txt.zst"))[:3]:
        text = zstandard.ZstdDecompressor().decompress(path.read_bytes(), max_output_size=1 << 26)
        for i in range(0, min(len(text), 400_000), 20_000):  # many documents, so val gets some
            (src / f"{path.stem}-{i:07d}.txt").write_bytes(text[i:i + 20_000])
    out = tmp_path_factory.mktemp("shards")
    # The split hashes each document's name (src/<novel>-<offset>.txt, the same every run): 0.3 gives val some.
    prepare(inputs=[str(src)], output=str(out), val_fraction=0.3, workers=2, progress=False)
    return out
