"""Releases: a checkpoint turned into files anyone can load without unpickling.

    convert.py   `pico convert`: checkpoint -> model.safetensors, config.json, model card, SHA256SUMS
    load.py      the format's names and version; load_release; load_model (a release or a checkpoint)

convert imports load and train.checkpoint; neither imports convert, so there is no cycle.
"""
