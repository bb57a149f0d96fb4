"""The address other nodes reach this one at: what Dask workers and MPI ranks advertise across
nodes. Never loopback: a peer on another node would only reach itself there.

    node_address()            # the host name's address, else the first non-loopback interface's
    node_address("ib0")       # that interface's IPv4 address
"""

from __future__ import annotations

import ipaddress
import socket

from .errors import ConfigError


def _usable(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return not (ip.is_loopback or ip.is_link_local or ip.is_unspecified)


def interface_addresses() -> dict[str, list[str]]:
    """IPv4 addresses of this machine's interfaces, by interface name."""
    import psutil

    return {
        name: [a.address for a in addrs if a.family == socket.AF_INET]
        for name, addrs in psutil.net_if_addrs().items()
    }


def node_address(interface: str | None = None) -> str:
    """This node's address for peers on other nodes. `interface` named: its address (an error if
    it has none). Otherwise the address this host name resolves to, as Slurm and MPI use it,
    unless that is loopback (Debian's 127.0.1.1 line); then the first interface with a usable
    IPv4 address. A ConfigError when there is none: set cluster.interface."""
    interfaces = interface_addresses()
    if interface:
        found = [a for a in interfaces.get(interface, []) if _usable(a)]
        if not found:
            known = ", ".join(sorted(n for n, a in interfaces.items() if a)) or "none"
            raise ConfigError(
                f"cluster.interface = {interface!r}: no IPv4 address on this node "
                f"({socket.gethostname()}); interfaces with one: {known}"
            )
        return found[0]
    try:
        resolved = {i[4][0] for i in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
    except OSError:
        resolved = set()
    for address in sorted(resolved):
        if _usable(address):
            return address
    for name in sorted(interfaces):
        for address in interfaces[name]:
            if _usable(address):
                return address
    raise ConfigError(
        f"this node ({socket.gethostname()}) has no address other nodes could reach (its host "
        "name resolves to loopback and no interface has another IPv4 address); set "
        "cluster.interface"
    )
