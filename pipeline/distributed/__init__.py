"""MPI's side of training: bootstrap (ranks meet, then torch.distributed), parallel dims,
parallelism applied as functions. Within training, only this package imports mpi4py (the trainer
uses `DistEnv.sum`/`max`); the other importer of the library is pipeline/executors/mpi.py, for dask-mpi's
roles."""
