"""Commands that drive the other parts and own no machinery of their own.

    eval.py         `pico eval`: bits per byte of a checkpoint or release (the measure is pipeline/eval/)
    info.py         `pico info`: parameter count and FLOPs per byte of a config
    generate.py     `pico generate`: bytes from a checkpoint or release (the decoder is pico.model.generate)
    quickstart.py   `pico quickstart`: prep, train, eval, convert and generate on a built-in corpus
"""
