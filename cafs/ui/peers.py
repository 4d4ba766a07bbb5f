"""Which local user is at the other end of a loopback TCP connection to `cafs ui`.

Owns: finding the owner of a client's socket in /proc/net/tcp and /proc/net/tcp6, and the
rule built on it. The store is 0700 and its control socket answers only root and the daemon's
own user (SO_PEERCRED); TCP carries no credentials, so without this any local user could read,
through a UI root started, a store they may not open. A connection from loopback is answered
only if its socket belongs to root or to the user running `cafs ui`. Must not speak HTTP
(cafs.ui.server) or read the store.

A connection from elsewhere (only possible with --bind off loopback, which warns that anyone
who reaches it reads the store) has no local owner to check.
"""

from __future__ import annotations

import ipaddress
import os
import struct
from pathlib import Path

Address = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]
TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))


def _address(field: str) -> Address:
    """'0100007F:1F4D' (the kernel prints each 32-bit word in host order) as (ip, port)."""
    host, port = field.split(":")
    words = [int(host[i:i + 8], 16) for i in range(0, len(host), 8)]
    packed = b"".join(struct.pack("=I", word) for word in words)
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(packed)
    return _plain(ip), int(port, 16)


def _plain(ip: ipaddress.IPv4Address | ipaddress.IPv6Address
           ) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """::ffff:127.0.0.1 (a dual-stack socket's view of an IPv4 peer) as 127.0.0.1."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def socket_owner(client: tuple[str, int], server: tuple[str, int]) -> int | None:
    """The uid owning the client's end of the connection client -> server, or None if no
    such socket is listed (the client already went away)."""
    wanted = ((_plain(ipaddress.ip_address(client[0])), client[1]),
              (_plain(ipaddress.ip_address(server[0])), server[1]))
    for table in TABLES:
        try:
            lines = table.read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if (_address(fields[1]), _address(fields[2])) == wanted:
                return int(fields[7])
    return None


def refusal(client: tuple[str, int], server: tuple[str, int]) -> str | None:
    """Why this connection may not read the view, or None if it may."""
    if not _plain(ipaddress.ip_address(client[0])).is_loopback:
        return None
    mine = os.getuid()
    owner = socket_owner(client, server)
    if owner in (0, mine):
        return None
    who = "an unknown user" if owner is None else f"uid {owner}"
    return (f"only root or uid {mine} (who runs this cafs ui) may read this view, as only they "
            f"may use the store's control socket; {who} connected: run cafs ui as a user who "
            "may read the store")
