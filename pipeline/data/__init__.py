"""Training and validation bytes for the trainer and `pico eval`.

    loader.py   resolve_shards, ByteBatches (shards split by rank and worker, packed into sequences,
                resumable from a saved position), eval_sequences (the fixed validation set)
"""
