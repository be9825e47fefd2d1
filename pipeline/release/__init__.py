"""Releases: a checkpoint turned into files anyone can load without unpickling.

    convert.py   `pico convert`: checkpoint -> model.safetensors, config.json, model card, SHA256SUMS
    load.py      the format's names and version; load_release; load_model (a release or a checkpoint)
    hf.py        `pico convert --format hf`: a transformers directory (pico's model source copied in,
                 byte tokenizer, generation config); templates/ holds its transformers wrappers

convert imports load, hf and train.checkpoint; load never imports convert, and hf takes convert's
writers (safetensors, model card) inside a function, so importing any of them starts no cycle.
"""
