"""The only package of the library that knows MPI: bootstrap, parallel dims, parallelism."""
