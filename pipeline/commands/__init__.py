"""Commands that drive the other parts and own no machinery of their own.

    info.py         `pico info`: parameter count and FLOPs per byte of a config
    generate.py     `pico generate`: bytes from a checkpoint or release (the decoder is pico.model.generate)
    quickstart.py   `pico quickstart`: prep, train, eval, convert and generate on a built-in corpus
"""
