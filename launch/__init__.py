"""launch: render and start training processes (local, Slurm, MPI). Imports neither data_prep nor pretrain."""
