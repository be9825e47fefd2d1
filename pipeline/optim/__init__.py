"""Optimizers.

    build.py   build_optimizer (OptimConfig -> torch optimizer: adamw or soap) and lr_at (warmup + decay)
    soap.py    SOAP: Adam in the eigenbasis of Shampoo's preconditioner, sharded by whole matrices
"""
