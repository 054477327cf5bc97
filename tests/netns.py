"""A second host for tests: a network namespace joined to this one by a veth pair (Debian's iproute2).

The namespace has its own loopback and one link, to this host's end of the pair: a process in it
reaches this host only at `host_ip`, never at 127.0.0.1, as a process on another machine would.
Names and the /30 subnet are random per run; everything is deleted on exit, even after a failure.
"""

from __future__ import annotations

import ipaddress
import os
import random
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

IP_TIMEOUT = 30


class NamespaceUnavailable(RuntimeError):
    """This machine cannot make network namespaces (not root, or no `ip`); the message says which."""


@dataclass(frozen=True)
class SecondHost:
    """A network namespace and the veth pair linking it to this host."""

    namespace: str
    host_device: str
    host_ip: str  # this host's end, in the root namespace: what the second host connects to
    guest_ip: str  # the second host's own address

    def argv(self, *command: str) -> list[str]:
        """`command` run inside the second host."""
        return ["ip", "netns", "exec", self.namespace, *command]

    def run(self, *command: str, env: Mapping[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*command), env=dict(env) if env is not None else None, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)  # fmt: skip

    def pids(self) -> set[int]:
        """PIDs of the processes running inside the namespace now."""
        done = _ip("netns", "pids", self.namespace, check=False)
        return {int(word) for word in done.stdout.split() if word.isdigit()}


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add); run the tests as root, as CI does"
    if shutil.which("ip") is None:
        return "no `ip` command: install Debian's iproute2 (`make test` does, as root)"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT, stdin=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def _subnets_in_use() -> list[ipaddress.IPv4Network]:
    routes = _ip("-4", "route", "show", "table", "all").stdout + _ip("-4", "-o", "addr", "show").stdout
    found = []
    for word in routes.split():
        try:
            found.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            continue
    return [net for net in found if isinstance(net, ipaddress.IPv4Network) and net.prefixlen > 0]


def _free_subnet() -> ipaddress.IPv4Network:
    """A random /30 in 10.0.0.0/8 that no route or address of this machine overlaps."""
    used = _subnets_in_use()
    for _ in range(100):
        net = ipaddress.ip_network(f"10.{random.randint(100, 254)}.{random.randint(0, 255)}.{random.randrange(0, 256, 4)}/30")
        if not any(net.overlaps(other) for other in used):
            return net
    raise RuntimeError("no free /30 in 10.100.0.0-10.254.255.255")


@contextmanager
def second_host() -> Iterator[SecondHost]:
    """Make a namespace + veth pair; on exit kill what runs inside it (by PID) and delete both."""
    reason = unavailable_reason()
    if reason:
        raise NamespaceUnavailable(reason)
    tag = secrets.token_hex(4)
    namespace, host_device, guest_device = f"koubou-{tag}", f"kbh{tag}", f"kbg{tag}"
    net = _free_subnet()
    host_ip, guest_ip = (str(address) for address in net.hosts())
    host = SecondHost(namespace, host_device, host_ip, guest_ip)
    try:
        _ip("netns", "add", namespace)
        _ip("link", "add", host_device, "type", "veth", "peer", "name", guest_device)
        _ip("link", "set", guest_device, "netns", namespace)
        _ip("addr", "add", f"{host_ip}/30", "dev", host_device)
        _ip("link", "set", host_device, "up")
        _ip("-n", namespace, "addr", "add", f"{guest_ip}/30", "dev", guest_device)
        _ip("-n", namespace, "link", "set", guest_device, "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        yield host
    finally:
        _kill_inside(host)
        _ip("link", "del", host_device, check=False)  # takes its peer with it
        _ip("netns", "del", namespace, check=False)


def _kill_inside(host: SecondHost) -> None:
    """Whatever a failed test left running in the namespace (all started by the test)."""
    if not Path(f"/run/netns/{host.namespace}").exists():
        return
    for pid in host.pids():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and host.pids():
        time.sleep(0.1)
