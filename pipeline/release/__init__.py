"""Releases: a checkpoint turned into files anyone can load without unpickling.

    convert.py   `pico convert`: checkpoint -> model.safetensors, config.json, model card, SHA256SUMS
    load.py      the format's names and version; load_release; load_model (a release or a checkpoint)
    files.py     writing a release's files: safetensors (deterministic header), canonical JSON, the model card
    hf.py        `pico convert --format hf`: a transformers directory (pico's model source copied in,
                 byte tokenizer, generation config); templates/ holds its transformers wrappers

Imports run one way: convert -> hf -> files -> load (and convert -> train.checkpoint); no module
here imports convert, so there is no cycle.
"""
