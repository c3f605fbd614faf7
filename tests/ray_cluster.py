"""Real Ray clusters for the tests, shared by ``test_ray.py`` and ``test_ray_faults.py``.

* :func:`local_ray_instance`: a local Ray instance in this process (``ray.init``), shut down at the end;
* :func:`start_head` / :func:`start_worker`: Ray nodes on this machine started the way an operator
  starts them (``ray start --block``), each in its own session (``start_new_session``), so that a
  node can be killed whole (:meth:`RayNode.kill`: SIGKILL to every process of its session: the
  ``ray start`` process, raylet, agents, workers) as a lost machine would be;
* :func:`alive_nodes`: the cluster's alive nodes as its GCS reports them (asked from a separate
  process: a token, if any, stays out of this process's environment).

Nothing here imports Ray at import time: the test modules skip first when Ray is not installed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

RAY_BIN = Path(sys.executable).with_name("ray")


def free_port() -> int:
    """A TCP port nothing listens on now (also what an unreachable ``--address`` looks like)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_ray_instance(num_cpus: int = 2) -> Iterator[object]:
    """``ray.init`` of a quiet local instance with ``num_cpus`` CPUs (workers at this process's niceness,
    as infer.py's own local instance); yields the ``ray`` module and shuts the instance down at the end."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    saved = os.environ.get("RAY_worker_niceness")
    os.environ["RAY_worker_niceness"] = "0"  # not niced further on a shared CI box
    try:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
            object_store_memory=100 * 1024 * 1024,
        )
    finally:
        if saved is None:
            os.environ.pop("RAY_worker_niceness", None)
        else:
            os.environ["RAY_worker_niceness"] = saved
    try:
        yield ray
    finally:
        ray.shutdown()


def _session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if os.getsid(int(entry)) == sid and stat.rpartition(")")[2].split()[0] != "Z":
                pids.append(int(entry))
        except (OSError, IndexError):  # gone meanwhile
            pass
    return pids


@dataclass
class RayNode:
    """One ``ray start --block`` process and everything it started (its session)."""

    proc: subprocess.Popen
    address: str  # the head's GCS address, HOST:PORT
    log: Path  # the ``ray start`` output
    temp_dir: Path | None = None  # the head's --temp-dir (removed by stop())

    def pids(self) -> list[int]:
        """Every live process of this node: ``ray start``, raylet, agents, its Ray workers."""
        return [p for p in _session_pids(self.proc.pid) if p != os.getpid()]

    def kill(self) -> list[int]:
        """SIGKILL every process of the node at once (a lost machine: no goodbye to the GCS); the pids killed."""
        killed: list[int] = []
        for _ in range(5):  # a process forked while we iterate is caught by the next pass
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        return sorted(set(killed))

    def stop(self, grace_s: float = 1.0) -> None:
        """SIGTERM the node, SIGKILL whatever is left after ``grace_s`` (a test cluster keeps nothing
        worth a graceful stop, which takes Ray 20 s or more); remove the head's temp dir."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(grace_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        self.kill()
        if self.temp_dir is not None:
            subprocess.run(["rm", "-rf", str(self.temp_dir)], check=False)

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def _ray_start(args: list[str], env: Mapping[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [str(RAY_BIN), "start", "--block", "--disable-usage-stats", *args],
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own session and process group: killed whole, never this process
        )


def start_head(
    env: Mapping[str, str], log: Path, num_cpus: int = 0, timeout: float = 60.0, extra: tuple[str, ...] = ()
) -> RayNode | None:
    """``ray start --head`` on a free port of this machine, every other port it opens free too (two
    heads, or a head and this process's local instance, never collide); None when its GCS port does
    not answer within ``timeout`` (the node is stopped); RuntimeError when ``ray start`` exits."""
    port = free_port()
    temp = Path("/tmp") / f"rt{port}"  # Ray's socket paths must stay short
    proc = _ray_start(
        ["--head", f"--port={port}", f"--num-cpus={num_cpus}", "--node-ip-address=127.0.0.1"]
        + ["--include-dashboard=false", f"--dashboard-port={free_port()}"]
        + [f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={temp}", *extra],
        env,
        log,
    )
    node = RayNode(proc, f"127.0.0.1:{port}", log, temp)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return node
        except OSError:
            if proc.poll() is not None:
                node.stop()
                raise RuntimeError(f"ray start --head exited ({proc.returncode}): {node.tail(500)}") from None
            time.sleep(0.2)
    node.stop()
    return None


def start_worker(
    head: RayNode, env: Mapping[str, str], log: Path, num_cpus: int = 1, resources: Mapping[str, float] | None = None
) -> RayNode:
    """``ray start --address HEAD`` (a worker node of ``head``'s cluster) on this machine."""
    args = [f"--address={head.address}", f"--num-cpus={num_cpus}", f"--dashboard-agent-listen-port={free_port()}"]
    if resources:
        args.append(f"--resources={json.dumps(dict(resources))}")
    return RayNode(_ray_start(args, env, log), head.address, log)


_ALIVE_NODES = """
import json, sys, time
from ray._raylet import GcsClient
address, want, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
client = GcsClient(address=address)
while True:
    nodes = {
        i.hex(): {"head": n.is_head_node, "resources": dict(n.resources_total)}
        for i, n in client.get_all_node_info(timeout=10).items()
        if n.state == 0  # ALIVE
    }
    if len(nodes) >= want or time.monotonic() > deadline:
        break
    time.sleep(0.2)
print(json.dumps(nodes))
"""


def alive_nodes(address: str, env: Mapping[str, str], at_least: int = 1, timeout: float = 60.0) -> dict[str, dict]:
    """{node id (hex): {"head": bool, "resources": {...}}} of the alive nodes, once there are
    ``at_least`` of them or ``timeout`` seconds have passed."""
    proc = subprocess.run(
        [sys.executable, "-c", _ALIVE_NODES, address, str(at_least), str(timeout)],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout + 30,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"cannot ask {address} for its nodes: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout)
