"""A real deployment on loopback: SuperLink with TLS and node authentication, 3 SuperNodes, flwr run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from client.task import local_data
from ddcore.runconfig import from_flat
from privacy.tls import write_key_material

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: flwr, flower-superlink, flower-supernode
BUDGET = 240.0  # seconds for the whole test
RUN_CONFIG = ("dataset='digits' num-clients=3 min-clients=3 ipc=2 model-width=16 iterations=10 "
              "train-epochs=10 train-min-steps=200 fedavg-rounds=0 round-timeout=90.0")


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held open together, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _children() -> dict[int, list[int]]:
    """ppid -> pids of every live process, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Flower detaches its SuperExec into a new session)."""
    tree, found, todo = _children(), [], [pid]
    while todo:
        kids = tree.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_pid(pid: int, wait: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if ``pid`` is still running after ``wait`` seconds."""
    for sig, grace in ((signal.SIGTERM, wait), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while running(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not running(pid):
            return


class Processes:
    """The processes this test starts; :meth:`stop` ends them (and what they spawned) by PID."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.procs: list[subprocess.Popen] = []
        self.seen: set[int] = set()  # every PID started, directly or by a started process

    def start(self, name: str, args: list[str], cwd: Path) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(args, cwd=cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs.append(proc)
        self.seen.add(proc.pid)
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            kids = descendants(proc.pid)
            self.seen.update(kids)
            if proc.poll() is None:
                stop_pid(proc.pid)
            proc.wait(timeout=10)
            for pid in kids:
                stop_pid(pid)


def wait_for_port(port: int, proc: subprocess.Popen, deadline: float) -> None:
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the SuperLink exited while starting"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port}")


def own_data_file(path: Path, partition: int) -> Path:
    """Partition ``partition`` of 3 of digits as a device's own .npz (uint8 pixels, int labels)."""
    data = local_data(from_flat({"dataset": "digits"}), {"partition-id": partition, "num-partitions": 3})
    pixels = data.x * torch.tensor(data.std).view(1, -1, 1, 1) + torch.tensor(data.mean).view(1, -1, 1, 1)
    np.savez(path, x=(pixels[:, 0] * 255).round().clamp(0, 255).to(torch.uint8).numpy(), y=data.y.numpy())
    return path


def run(args: list[str], env: dict[str, str], deadline: float) -> subprocess.CompletedProcess:
    """Run a command from the repository (``flwr run .`` packages it), within the test's budget."""
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=max(1.0, deadline - time.monotonic()))


@pytest.mark.integration
def test_tls_authenticated_deployment_runs_and_refuses_strangers(tmp_path: Path) -> None:
    deadline = time.monotonic() + BUDGET
    keys = write_key_material(tmp_path / "keys", "127.0.0.1,localhost", nodes=4)  # node3: never registered
    home, out, logs = tmp_path / "flwr-home", tmp_path / "out", tmp_path / "logs"
    home.mkdir()
    logs.mkdir()
    link_port, *node_ports = free_ports(6)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "edge"\n\n[superlink.edge]\n'
        f'address = "127.0.0.1:{link_port}"\nroot-certificates = "{keys.ca_cert}"\n'
    )
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(home),
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    procs = Processes(env, logs)
    supernode = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{link_port}"]
    try:
        link = procs.start("superlink", [
            str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(keys.ca_cert),
            "--ssl-certfile", str(keys.server_cert), "--ssl-keyfile", str(keys.server_key),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--database", str(tmp_path / "state.db"), "--host", "127.0.0.1", "--port", str(link_port),
        ], cwd=tmp_path)
        wait_for_port(link_port, link, deadline)
        for pub in keys.node_public_keys[:3]:
            reg = run([str(BIN / "flwr"), "supernode", "register", str(pub), "edge"], env, deadline)
            assert reg.returncode == 0 and "registered successfully" in reg.stdout, reg.stdout + reg.stderr

        # strangers: an unregistered key is refused; a node that does not trust the CA cannot connect
        retries = ["--max-retries", "1", "--max-wait-time", "20"]
        stranger = procs.start("unregistered", [
            *supernode, "--root-certificates", str(keys.ca_cert), "--auth-supernode-private-key",
            str(keys.node_keys[3]), "--port", str(node_ports[3]), *retries], cwd=tmp_path)
        no_ca = procs.start("no-ca", [
            *supernode, "--auth-supernode-private-key", str(keys.node_keys[0]),
            "--port", str(node_ports[4]), *retries], cwd=tmp_path)
        for proc in (stranger, no_ca):
            proc.wait(timeout=max(1.0, min(60.0, deadline - time.monotonic())))
            assert proc.returncode != 0
        assert "Failed to activate SuperNode" in procs.log("unregistered")
        assert "No SuperNode found with the given public key" in procs.log("superlink")
        assert "CERTIFICATE_VERIFY_FAILED" in procs.log("no-ca")

        # nodes 0 and 1 take a partition of the run's dataset; node 2 brings its own file
        node_configs = ["partition-id=0 num-partitions=3", "partition-id=1 num-partitions=3",
                        f"data-path='{own_data_file(tmp_path / 'node2.npz', 2)}' client-id=2"]
        for i, node_config in enumerate(node_configs):
            procs.start(f"supernode{i}", [
                *supernode, "--root-certificates", str(keys.ca_cert),
                "--auth-supernode-private-key", str(keys.node_keys[i]), "--port", str(node_ports[i]),
                "--node-config", node_config], cwd=tmp_path)
        result = run([str(BIN / "flwr"), "run", ".", "edge", "--stream",
                      "--run-config", f"{RUN_CONFIG} out-dir='{out}'"], env, deadline)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "final accuracy" in result.stdout
    finally:
        procs.stop()

    left = [pid for pid in procs.seen if running(pid)]
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert not left and str(tmp_path) not in ps, ps

    report = json.loads((out / "report.json").read_text())
    distill = report["methods"]["distill"]
    assert distill["final_accuracy"] >= 0.3  # chance is 0.1 on digits
    clients = distill["clients"]
    assert sorted(c["client_id"] for c in clients) == [0, 1, 2]
    assert all(c["status"] == "accepted" for c in clients) and not distill["round_notes"]
    for c in clients:
        # float32 (1, 8, 8) images plus int64 labels, then .npy headers, metadata and metrics
        assert c["array_bytes_up"] == c["images"] * (64 * 4 + 8) > 0
        assert c["bytes_up"] > c["array_bytes_up"] and c["bytes_down"] > 0
    assert distill["bytes_up"] == sum(c["bytes_up"] for c in clients)
    assert distill["history"][-1]["bytes_up_cum"] == distill["bytes_up"]
    assert distill["pooled_images"] == sum(c["images"] for c in clients)
