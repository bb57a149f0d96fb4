"""Addresses across nodes (what Dask and the MPI ranks advertise) and the naming of lost ranks:
the parts of the multi-node support that need no namespaces, so they are checked everywhere."""

import socket

import pytest

from fastserve.pipeline import netaddr
from fastserve.pipeline.config import ClusterConfig
from fastserve.pipeline.distributed.bootstrap import _listen_for_liveness, diagnose, lost_ranks
from fastserve.pipeline.errors import ConfigError
from fastserve.pipeline.executors.slurm import listen_on
from fastserve.pipeline.slurm_env import SlurmEnv


@pytest.fixture
def debian_host(monkeypatch):
    """A host name that resolves to 127.0.1.1 (Debian's /etc/hosts), and two interfaces."""
    monkeypatch.setattr(socket, "gethostname", lambda: "nodeX")
    monkeypatch.setattr(
        socket, "getaddrinfo", lambda *a, **k: [(None, None, None, "", ("127.0.1.1", 0))]
    )
    monkeypatch.setattr(
        netaddr, "interface_addresses", lambda: {"lo": ["127.0.0.1"], "eth9": ["10.1.2.3"]}
    )


def test_a_host_name_on_loopback_falls_back_to_an_interface(debian_host):
    assert netaddr.node_address() == "10.1.2.3"
    assert netaddr.node_address("eth9") == "10.1.2.3"
    with pytest.raises(ConfigError, match="cluster.interface = 'lo': no IPv4 address"):
        netaddr.node_address("lo")
    with pytest.raises(ConfigError, match="interfaces with one: eth9, lo"):
        netaddr.node_address("ib0")


def test_no_address_but_loopback_is_an_error_naming_the_setting(debian_host, monkeypatch):
    monkeypatch.setattr(netaddr, "interface_addresses", lambda: {"lo": ["127.0.0.1"]})
    with pytest.raises(ConfigError, match="set cluster.interface"):
        netaddr.node_address()


def test_dask_listens_on_loopback_only_on_one_node(debian_host):
    one = SlurmEnv(job_id="1", nnodes=1)
    two = SlurmEnv(job_id="1", nnodes=2)
    assert listen_on(ClusterConfig(), one) == {"host": "127.0.0.1"}
    assert listen_on(ClusterConfig(), two) == {"host": "10.1.2.3"}  # not 127.0.1.1
    assert listen_on(ClusterConfig(interface="eth9"), two) == {"host": "10.1.2.3"}


def test_this_machine_has_an_address_for_other_nodes():
    address = netaddr.node_address()
    assert not address.startswith("127.")


def test_lost_ranks_are_named_by_node_and_by_process():
    alive = _listen_for_liveness()
    with socket.socket() as s:  # a port nothing listens on: a dead rank's
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    peers = [("a", "127.0.0.1", alive), ("b", "127.0.0.1", alive), ("b", "127.0.0.1", dead)]
    assert lost_ranks(peers, me=0) == [2]
    assert diagnose(peers, 0) == (
        "[rank 0] lost contact with rank 2 on b: the process is gone (its node still answers)"
    )
    peers = [("a", "127.0.0.1", alive), ("c", "127.0.0.1", dead)]
    assert diagnose(peers, 0) == (
        "[rank 0] lost contact with rank 1 on c: no rank on c answers: the node is gone or cut "
        "off, or its processes died"
    )
    assert "every other rank still answers" in diagnose([("a", "127.0.0.1", alive)] * 2, 0)
