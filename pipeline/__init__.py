"""The pipeline: train, evaluate, release and generate, behind one `pico` command line.

    cli.py        `pico COMMAND`: dispatches to the module that owns each command
    dist.py       rank and world size from the environment, one process-group init, print on rank 0
    commands/     commands that only drive other parts: info, generate, quickstart
    data/         loader.py: shards -> packed byte sequences per rank and worker, resumable; eval sequences
    train/        trainer.py (`pico train`, DeepSpeed), checkpoint.py, metrics.py, pictures.py (routing)
    optim/        build.py (`build_optimizer`, learning-rate schedule), soap.py (the SOAP optimizer)
    eval/         evaluate.py: `pico eval`, bits per byte per head
    release/      convert.py (`pico convert`: checkpoint -> safetensors release), load.py (load_release,
                  load_model: a release or a checkpoint, whichever it is given)

The config tree and UserError live in `pico.configs`; the network in `pico.model`.
"""
