"""Optimizers.

    build.py   build_optimizer (OptimConfig -> torch optimizer: adamw or soap; param groups by stage and decay),
               lr_at (warmup + decay) and set_lr (the schedule's LR times each group's stage scale)
    soap.py    SOAP: Adam in the eigenbasis of Shampoo's preconditioner, sharded by whole matrices
"""
