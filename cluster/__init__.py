"""Cluster submission: turn a config into a Slurm batch job or a Ray Job; no training logic here.

    plan.py       the request (nodes, GPUs, time), checks that refuse impossible ones, estimates
    slurm.py      the sbatch script (sbatch -> srun -> torchrun -> pico train), sbatch/squeue/scontrol
    ray_jobs.py   Ray Jobs through the dashboard's job API (pico prep | train as the entrypoint)
    cli.py        `pico submit slurm|ray`;  jobs.py: `pico jobs status|logs|cancel`
    slurm/        start_slurm.sh / stop_slurm.sh: the private single-node Slurm the tests run on
"""
