"""Loopback addresses for LocalCloud VMs: each VM its own 127.64.x.y, floating IPs from 127.65.x.y.

Linux answers on all of 127.0.0.0/8 without any configuration, so giving every VM its own address
needs no interface, route or privilege: a VM's sshd simply binds its address. Addresses are
handed out in order (lowest free first, never a .0 or .255 host part, which tools often treat as
network or broadcast addresses) and come back when the VM is deleted. An address on which some
process already listens (another LocalCloud home, a test's sshd) is skipped.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Iterable
from pathlib import Path

from slipstream.cloud.errors import QuotaExceeded


def _listening() -> list[tuple[str, int, int]]:
    """(address, port, socket inode) of every IPv4 TCP socket in LISTEN state."""
    found = []
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return found
    for line in lines:
        fields = line.split()
        if len(fields) < 10 or fields[3] != "0A":  # 0A: LISTEN
            continue
        host_hex, port_hex = fields[1].split(":")
        # The kernel prints the address as a native-endian number holding network-order bytes.
        address = socket.inet_ntoa(struct.pack("=I", int(host_hex, 16)))
        found.append((address, int(port_hex, 16), int(fields[9])))
    return found


def tcp_listeners() -> set[tuple[str, int]]:
    """(address, port) of every IPv4 TCP socket in LISTEN state, from /proc/net/tcp."""
    return {(address, port) for address, port, _ in _listening()}


def listens(pid: int, address: str, port: int) -> bool:
    """Does process ``pid`` itself hold the socket listening on ``address:port``? (Another
    process, e.g. a VM of another LocalCloud home on the same address, does not count.)"""
    inodes = {inode for a, p, inode in _listening() if (a, p) == (address, port)}
    if not inodes:
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and int(link[8:-1]) in inodes:
            return True
    return False


def allocate(network: str, count: int, used: Iterable[str], *, what: str, cloud: str) -> list[str]:
    """The ``count`` lowest free addresses of ``network`` (in 127.0.0.0/8)."""
    taken = set(used) | {addr for addr, _ in tcp_listeners()}
    found: list[str] = []
    for ip in ipaddress.ip_network(network).hosts():
        last = int(ip) & 0xFF
        if last in (0, 255):
            continue
        text = str(ip)
        if text not in taken:
            found.append(text)
            if len(found) == count:
                return found
    raise QuotaExceeded(f"no free {what} address left in {network}", cloud=cloud,
                        hint="Delete servers or floating IPs you no longer need.")
