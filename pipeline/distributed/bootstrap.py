"""MPI launches and meets the ranks; torch.distributed moves the tensors.

    env = bootstrap(timeout_s=60)     # under `mpiexec -n N`, `srun --mpi=pmi2`, or alone
    ...
    shutdown(env)

Rank, size and local rank come from MPI; rank 0 picks a free port on its host and broadcasts the
rendezvous address; every rank joins the process group (gloo on CPU, NCCL on GPU, one GPU per local
rank). The MPI Abort hook is installed *after* `init_process_group` (which replaces sys.excepthook),
so a rank that raises prints its traceback and ends the whole job at once; the group's timeout is
finite, so a rank stuck in a collective raises too, instead of hanging the job for 30 minutes.

Across nodes a failed collective rarely says who is gone (a timeout names no peer). Each rank
therefore answers on a small liveness port whose address every rank knows; the abort hook asks
every peer before it ends the job and names the ranks that no longer answer, and their nodes.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: object  # torch.device
    backend: str
    comm: object  # the MPI communicator (control plane: small host-side messages)
    peers: tuple = field(default=(), repr=False)
    """Per rank: (host name, liveness address, port); see lost_ranks."""

    def sum(self, value):
        """`value` summed over every rank (a small host-side number: counts, flags)."""
        from mpi4py import MPI

        return self.comm.allreduce(value, op=MPI.SUM)

    def max(self, value):
        """The largest `value` of any rank (e.g. whether any rank was asked to stop)."""
        from mpi4py import MPI

        return self.comm.allreduce(value, op=MPI.MAX)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _listen_for_liveness() -> int:
    """A port on every interface that accepts and closes at once, from a daemon thread: a peer
    that can connect knows this process (and its node) is still there."""
    server = socket.socket()
    server.bind(("", 0))
    server.listen(64)

    def serve():
        while True:
            try:
                conn, _ = server.accept()
                conn.close()
            except OSError:
                return

    threading.Thread(target=serve, name="fastserve-liveness", daemon=True).start()
    return server.getsockname()[1]


def _my_address() -> str:
    """The address peers on other nodes reach this rank at (never loopback); on a machine with
    no other address, its host name (one node: enough)."""
    from ..errors import ConfigError
    from ..netaddr import node_address

    try:
        return node_address()
    except ConfigError:
        return socket.gethostname()


def lost_ranks(peers, me: int, timeout_s: float = 3.0) -> list[int]:
    """The ranks whose liveness port does not accept a connection within `timeout_s` (all asked
    at once): their process is gone, or their node is unreachable."""

    def answers(rank: int) -> bool:
        _, address, port = peers[rank]
        try:
            socket.create_connection((address, port), timeout=timeout_s).close()
            return True
        except OSError:
            return False

    others = [r for r in range(len(peers)) if r != me]
    if not others:
        return []
    with ThreadPoolExecutor(len(others)) as pool:
        return [r for r, ok in zip(others, pool.map(answers, others), strict=True) if not ok]


def diagnose(peers, me: int) -> str:
    """One line on who is gone, for a rank about to end the job after a failure."""
    if len(peers) < 2:
        return ""
    lost = lost_ranks(peers, me)
    if not lost:
        return (
            f"[rank {me}] every other rank still answers: one is stuck, or the fault is this rank's"
        )
    who = ", ".join(f"rank {r} on {peers[r][0]}" for r in lost)
    silent = sorted({peers[r][0] for r in lost})
    # a node none of whose ranks answers is gone or cut off; otherwise only processes died
    gone = [n for n in silent if all(r in lost for r in range(len(peers)) if peers[r][0] == n)]
    why = (  # every rank of a node silent: it may be gone, or only its processes
        f"no rank on {', '.join(gone)} answers: the node is gone or cut off, or its processes died"
        if gone
        else "the process is gone (its node still answers)"
    )
    return f"[rank {me}] lost contact with {who}: {why}"


def _abort_hook(comm, peers=()):
    def hook(kind, value, tb):
        sys.stderr.write(f"[rank {comm.Get_rank()}] uncaught {kind.__name__}; aborting the job\n")
        traceback.print_exception(kind, value, tb)
        sys.stderr.flush()
        line = diagnose(peers, comm.Get_rank())
        if line:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        time.sleep(1)  # let the launcher forward the traceback before Abort tears the job down
        comm.Abort(1)

    return hook


_JOINED: DistEnv | None = None  # a process joins once (a second DistributedModel reuses it)


def bootstrap(timeout_s: float = 120, device: str = "auto") -> DistEnv:
    """Join MPI and torch.distributed; return who this rank is."""
    global _JOINED
    import torch
    import torch.distributed as dist
    from mpi4py import MPI

    if _JOINED is not None and dist.is_initialized():
        return _JOINED

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    # From here any rank's failure must end the job: before the process group exists the others
    # would wait in an MPI collective forever. (Installed again below: init replaces it.)
    sys.excepthook = _abort_hook(comm)
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank = local.Get_rank()
    local.Free()
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev, backend = torch.device("cuda", local_rank), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    # Rank 0's own address (its host name's, never loopback): the rendezvous works across nodes.
    addr = comm.bcast(
        (_my_address() if size > 1 else "127.0.0.1", _free_port()) if rank == 0 else None
    )
    if size == 1:
        addr = ("127.0.0.1", addr[1])
        peers: tuple = ()
    else:
        peers = tuple(comm.allgather((socket.gethostname(), _my_address(), _listen_for_liveness())))
    os.environ.setdefault("MASTER_ADDR", addr[0])
    os.environ.setdefault("MASTER_PORT", str(addr[1]))
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{addr[0]}:{addr[1]}",
        rank=rank,
        world_size=size,
        timeout=timedelta(seconds=timeout_s),
        device_id=dev if use_cuda else None,
    )
    sys.excepthook = _abort_hook(comm, peers)  # after init_process_group, which replaces it
    _JOINED = DistEnv(rank, size, local_rank, dev, backend, comm, peers)
    return _JOINED


def shutdown(env: DistEnv) -> None:
    global _JOINED
    import torch.distributed as dist

    _JOINED = None
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
