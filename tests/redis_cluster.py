"""A real Redis Cluster on loopback for the tests: three masters, three replicas.

Six `redis-server --cluster-enabled yes` processes in a temporary directory (no RDB, no
AOF), joined with `redis-cli --cluster create --cluster-replicas 1`, with a short node
timeout so that a killed master's replica takes over within a couple of seconds.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.crc import key_slot

NODES = 6
NODE_TIMEOUT_MS = 1000
"""How long a node may be silent before the others fail it over (the default is 15 s)."""


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """`count` loopback ports free now whose cluster bus ports (+10000) are free too."""
    for _ in range(200):
        base = random.randrange(20000, 25000 - count)
        ports = list(range(base, base + count))
        if all(_free(p) and _free(p + 10000) for p in ports):
            return ports
    raise RuntimeError("no free loopback ports for a Redis Cluster")


def _flat(value: object) -> str:
    """redis-py parses `slave0:ip=...,port=...,offset=...` into a dict: back to its text."""
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) + ","
    return str(value)


@dataclass
class Node:
    port: int
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5, socket_connect_timeout=2)

    def info(self, section: str) -> dict[str, str]:
        """INFO `section` as text fields (an unreachable node gives {})."""
        try:
            with self.client() as client:
                parsed = client.info(section)
        except (redis.RedisError, OSError):
            return {}
        return {k: v if isinstance(v, str) else _flat(v) for k, v in parsed.items()}

    def state(self) -> str:
        """`cluster_state` from CLUSTER INFO ('' if the node does not answer)."""
        try:
            with self.client() as client:
                raw = client.execute_command("CLUSTER", "INFO")
        except (redis.RedisError, OSError):
            return ""
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return "ok" if "cluster_state:ok" in text else "fail"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class LocalCluster:
    """The six servers; `url` is the `redis+cluster://` URL streamsink takes."""

    directory: Path
    nodes: list[Node]

    @property
    def url(self) -> str:
        seeds = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:3])
        return f"redis+cluster://{seeds}"

    def start(self) -> None:
        for node in self.nodes:
            self.spawn(node)
        for node in self.nodes:
            self.wait(lambda node=node: node.info("server") != {}, f"node {node.port} answers")
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not installed")
        hosts = [f"127.0.0.1:{n.port}" for n in self.nodes]
        made = subprocess.run(
            [cli, "--cluster", "create", *hosts, "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True,
            timeout=60,
        )
        if made.returncode != 0:
            raise RuntimeError(
                f"redis-cli --cluster create failed: {made.stdout!r} {made.stderr!r}"
            )
        self.wait(self.whole, "cluster_state:ok, three masters with a replica each")

    def spawn(self, node: Node) -> None:
        """Start `node`'s server (again: it rejoins with its nodes.conf, as a replica if its
        slots were failed over meanwhile)."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        node.process = subprocess.Popen(
            [
                binary,
                "--port", str(node.port),
                "--bind", "127.0.0.1",
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{node.port}.conf",
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                "--cluster-replica-validity-factor", "0",  # a replica always takes over
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def restore(self) -> None:
        """Restart every killed node and wait until each master has a replica again."""
        for node in self.nodes:
            if not node.alive():
                self.spawn(node)

        self.wait(self.whole, "every node back, three masters with a replica each")

    def whole(self) -> bool:
        """`healthy`, and every master has a replica linked to it."""
        if not self.healthy():
            return False
        linked = [n.info("replication").get("master_link_status") for n in self.nodes]
        return linked.count("up") == 3

    def healthy(self) -> bool:
        """Every live node says cluster_state:ok and sees three masters with a replica each
        (the topology the tests start from, and come back to after a failover)."""
        live = [n for n in self.nodes if n.alive()]
        if not all(n.state() == "ok" for n in live):
            return False
        return len(self.masters()) == 3

    def masters(self) -> list[Node]:
        """The live nodes that are masters now."""
        return [
            n for n in self.nodes if n.alive() and n.info("replication").get("role") == "master"
        ]

    def replica_of(self, master: Node) -> Node:
        """The live replica of `master`."""
        for node in self.nodes:
            info = node.info("replication") if node.alive() else {}
            if info.get("role") == "slave" and info.get("master_port") == str(master.port):
                return node
        raise AssertionError(f"master {master.port} has no live replica")

    def in_sync(self, master: Node) -> bool:
        """Whether `master`'s replica has every write the master has (replication offsets)."""
        info = master.info("replication")
        offset = info.get("master_repl_offset")
        replica = info.get("slave0", "")
        return offset is not None and f"offset={offset}," in replica

    def quiesce(self, master: Node) -> None:
        """Hold every write `master` gets (they wait, as if the network were slow) until its
        replica has all it took: a kill then loses nothing acknowledged. Replication is
        asynchronous, so a master killed mid-stream may lose its last writes."""
        with master.client() as client:
            client.execute_command("CLIENT", "PAUSE", 30_000, "WRITE")
        self.wait(lambda: self.in_sync(master), f"the replica of {master.port} caught up")

    def master_of(self, key: str) -> Node:
        """The live master serving the slot of `key`, as that master says."""
        slot = key_slot(key.encode())
        for node in self.masters():
            with node.client() as client:
                for start, end, owner, *_ in client.execute_command("CLUSTER", "SLOTS"):
                    if start <= slot <= end and int(owner[1]) == node.port:
                        return node
        raise AssertionError(f"no master serves slot {slot}")

    def kill(self, node: Node) -> None:
        """SIGKILL a node, as a crash would."""
        assert node.process is not None
        node.process.kill()
        node.process.wait()

    def stop(self) -> None:
        for node in self.nodes:
            if node.alive():
                assert node.process is not None
                node.process.kill()
                node.process.wait()

    @staticmethod
    def wait(check: object, what: str, timeout: float = 30) -> None:
        """Poll `check()` until true; fail after `timeout` seconds."""
        assert callable(check)
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout} s: {what}")
            time.sleep(0.05)
