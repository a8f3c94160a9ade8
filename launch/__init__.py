"""launch: render and start training processes (local, MPI, Slurm).

Owns the local launcher (:mod:`~launch.local`), ``mpirun`` (:mod:`~launch.mpi`), sbatch rendering and
submission (:mod:`~launch.slurm`, :mod:`~launch.sbatch_scripts`) and launch errors.

May import: ``lmforge_common`` (the exit-code contract, the rendezvous port, the user-error base).
Never ``data_prep``, ``pretrain`` or ``lmforge``: a launcher starts ``lmforge train`` as a command and
learns how it ended from its exit code alone.
"""
