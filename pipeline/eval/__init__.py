"""Evaluation.

    evaluate.py   bits per byte per MTP head of a model over byte batches (the `pico eval` command is
                  pipeline/commands/eval.py, beside the other commands)
"""
