"""Where runs go: SLURM jobs through submitit (`pretrain --launcher slurm`, `compare --launcher slurm`).

Modules: config (the launcher settings), slurm (the job submitit runs, submitting, waiting), pretrain (the
pretrain command's launcher flags and submission).
"""
