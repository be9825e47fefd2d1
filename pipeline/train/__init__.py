"""Training: the DeepSpeed loop and what it writes.

    trainer.py      `pico train`: config -> engine, loop, eval, checkpoints, logs; deepspeed_config
    checkpoint.py   complete-or-absent checkpoints: save, discover (latest_checkpoint), resume, load_model_state
    metrics.py      metrics.jsonl and the W&B run
    pictures.py     the routing picture: which bytes the router sent to the latent blocks
"""
