"""`pico experiment`: matched-FLOP comparisons of model families from a design file.

    design.py   the design (YAML -> dataclasses, strict), shapes resolved and costed, steps per budget
    plan.py     the LR rule and the launch order: which runs are ready, given the finished ones
    data.py     a domain's training shards and held-out test/select sets (prepared with `pico prep`)
    job.py      one run: `pico train`, `pico eval` on test and select, one result JSON (`run-one`)
    drive.py    the driver: local processes, a Slurm array (cluster/slurm.py) or Ray jobs; the estimate
    store.py    result JSONs on disk (atomic), failures, experiments 2-4's records
    table.py    bpb per cell, paired ratios, router behaviour, missing cells, the scaling plot
    cli.py      `pico experiment run|status|table DESIGN.yaml`
"""
