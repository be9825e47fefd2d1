"""Evaluation.

    evaluate.py   `pico eval`: bits per byte per MTP head of a checkpoint or release, on shards or text
"""
