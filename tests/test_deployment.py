"""A fleet on loopback: TLS + node auth, three SuperNodes run a round, one is added, one revoked."""

from __future__ import annotations

import json
import os
import shutil
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
from privacy.tls import main as tls_main
from privacy.tls import write_key_material

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: flwr, flower-superlink, flower-supernode
BUDGET = 420.0  # seconds for the whole test
RUN_CONFIG = ("dataset='digits' min-clients=3 ipc=2 model-width=16 iterations=10 "
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

    def wait_exit(self, proc: subprocess.Popen, deadline: float, limit: float = 60.0) -> int:
        """The return code of ``proc``, which must exit within ``limit`` seconds (and the budget)."""
        return proc.wait(timeout=max(1.0, min(limit, deadline - time.monotonic())))

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


def own_data_file(path: Path, partition: int, shape: tuple[int, int] | None = None) -> Path:
    """Partition ``partition`` of 3 of digits as a device's own .npz (uint8 pixels, int labels).

    With ``shape`` (H, W), the same images as RGB of that size: a file that does not match the run.
    """
    data = local_data(from_flat({"dataset": "digits"}), {"partition-id": partition, "num-partitions": 3})
    pixels = data.x * torch.tensor(data.std).view(1, -1, 1, 1) + torch.tensor(data.mean).view(1, -1, 1, 1)
    x = (pixels[:, 0] * 255).round().clamp(0, 255).to(torch.uint8).numpy()  # (N, 8, 8)
    if shape is not None:
        x = np.repeat(np.resize(x, (len(x), *shape))[..., None], 3, axis=-1)  # (N, H, W, 3)
    np.savez(path, x=x, y=data.y.numpy())
    return path


def stage_app(folder: Path) -> Path:
    """The app as ``flwr run`` ships it (pyproject's ``fab-include``: the four packages), copied to
    ``folder``: building the FAB from the repository walks every file below it, a ``.venv`` too
    (9-13 s per run on this machine), while the staged copy builds the same FAB (same hash) in about 2 s."""
    shutil.copy2(REPO / "pyproject.toml", folder / "pyproject.toml")
    for package in ("server", "client", "ddcore", "privacy"):
        shutil.copytree(REPO / package, folder / package, ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def run(args: list[str], env: dict[str, str], deadline: float) -> subprocess.CompletedProcess:
    """Run a command from the repository, within the test's budget."""
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=max(1.0, deadline - time.monotonic()))


def register(pub: Path, env: dict[str, str], deadline: float) -> int:
    """``flwr supernode register ... --format json`` (as the README keeps it); returns the node id."""
    reg = run([str(BIN / "flwr"), "supernode", "register", str(pub), "edge", "--format", "json"],
              env, deadline)
    assert reg.returncode == 0, reg.stdout + reg.stderr
    answer = json.loads(reg.stdout)
    assert answer["success"], answer
    return int(answer["node-id"])


def flwr_run(app: Path, out: Path, clients: int, env: dict[str, str], deadline: float) -> dict:
    """``flwr run APP edge --stream`` for ``clients`` nodes; returns the distillation report."""
    result = run([str(BIN / "flwr"), "run", str(app), "edge", "--stream",
                  "--run-config", f"{RUN_CONFIG} num-clients={clients} out-dir='{out}'"], env, deadline)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "final accuracy" in result.stdout
    return json.loads((out / "report.json").read_text())["methods"]["distill"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.integration
def test_a_fleet_runs_grows_by_a_node_and_cuts_off_a_revoked_one(tmp_path: Path) -> None:
    start = deadline = time.monotonic()
    deadline += BUDGET
    keys = write_key_material(tmp_path / "keys", "127.0.0.1,localhost", nodes=3)
    home, logs, app = tmp_path / "flwr-home", tmp_path / "logs", tmp_path / "app"
    for folder in (home, logs, app):
        folder.mkdir()
    stage_app(app)
    ports = iter(free_ports(10))  # the SuperLink's, then one per SuperNode started
    link_port = next(ports)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "edge"\n\n[superlink.edge]\n'
        f'address = "127.0.0.1:{link_port}"\nroot-certificates = "{keys.ca_cert}"\n'
    )
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(home),
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    procs = Processes(env, logs)
    retries = ["--max-retries", "1", "--max-wait-time", "20"]

    def supernode(name: str, i: int, *extra: str) -> subprocess.Popen:
        return procs.start(name, [
            str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{link_port}", "--root-certificates",
            str(keys.ca_cert), "--auth-supernode-private-key", str(keys.ca_cert.parent / f"node{i}"),
            "--port", str(next(ports)), *extra], cwd=tmp_path)

    timings: dict[str, float] = {}
    try:
        link = procs.start("superlink", [
            str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(keys.ca_cert),
            "--ssl-certfile", str(keys.server_cert), "--ssl-keyfile", str(keys.server_key),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--database", str(tmp_path / "state.db"), "--host", "127.0.0.1", "--port", str(link_port),
        ], cwd=tmp_path)
        wait_for_port(link_port, link, deadline)
        node_ids = [register(pub, env, deadline) for pub in keys.node_public_keys]

        # a node that does not trust the CA cannot connect
        no_ca = procs.start("no-ca", [
            str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{link_port}",
            "--auth-supernode-private-key", str(keys.node_keys[0]), "--port", str(next(ports)), *retries],
            cwd=tmp_path)
        assert procs.wait_exit(no_ca, deadline) != 0
        timings["set-up and no-CA node refused"] = time.monotonic() - start
        assert "CERTIFICATE_VERIFY_FAILED" in procs.log("no-ca")

        # run 1: nodes 0 and 1 take a partition of the run's dataset; node 2 brings its own file
        own2 = own_data_file(tmp_path / "node2.npz", 2)
        nodes = [supernode("supernode0", 0, "--node-config", "partition-id=0 num-partitions=3"),
                 supernode("supernode1", 1, "--node-config", "partition-id=1 num-partitions=3"),
                 supernode("supernode2", 2, "--node-config", f"data-path='{own2}' client-id=2")]
        run1_start = time.monotonic()
        first = flwr_run(app, tmp_path / "run1", 3, env, deadline)
        timings["run 1"] = time.monotonic() - run1_start
        assert sorted(c["client_id"] for c in first["clients"]) == [0, 1, 2]
        assert all(c["status"] == "accepted" for c in first["clients"]) and not first["round_notes"]
        examples = {c["client_id"]: c["examples"] for c in first["clients"]}
        assert examples[2] == len(np.load(own2)["y"]) > 0  # the device's file distilled whole
        assert first["final_accuracy"] >= 0.3  # chance is 0.1 on digits

        # grow: two node keys added to the existing folder; CA, server and node0-2 keys untouched
        before = snapshot(keys.ca_cert.parent)
        assert tls_main(["--out", str(keys.ca_cert.parent), "--add-nodes", "2"]) == 0
        after = snapshot(keys.ca_cert.parent)
        assert {n: after[n] for n in before} == before
        assert sorted(set(after) - set(before)) == ["node3", "node3.pub", "node4", "node4.pub"]
        early = supernode("node3-unregistered", 3, *retries)  # not registered yet: refused
        early_start = time.monotonic()
        assert procs.wait_exit(early, deadline) != 0
        timings["unregistered node refused after"] = time.monotonic() - early_start
        assert "Failed to activate SuperNode" in procs.log("node3-unregistered")
        assert "No SuperNode found with the given public key" in procs.log("superlink")
        node_ids += [register(keys.ca_cert.parent / f"node{i}.pub", env, deadline) for i in (3, 4)]

        # revoke node 1 while it runs: it is cut off, and refused when it connects again
        revoked_at = time.monotonic()
        out = run([str(BIN / "flwr"), "supernode", "unregister", str(node_ids[1]), "edge"], env, deadline)
        assert out.returncode == 0 and f"SuperNode {node_ids[1]} unregistered" in out.stdout, out.stderr
        procs.wait_exit(nodes[1], deadline)
        timings["revoked node stopped after"] = time.monotonic() - revoked_at
        again = supernode("supernode1-again", 1, "--node-config", "partition-id=1 num-partitions=3", *retries)
        assert procs.wait_exit(again, deadline) != 0
        assert "Failed to activate SuperNode" in procs.log("supernode1-again")
        back = run([str(BIN / "flwr"), "supernode", "register", str(keys.node_public_keys[1]), "edge"],
                   env, deadline)
        assert back.returncode != 0 and "registered successfully" not in back.stdout  # revoked for good

        # run 2: nodes 0 and 2 as before, node 3 joins with its own file, node 4's file does not match
        own3 = own_data_file(tmp_path / "node3.npz", 1)
        wrong = own_data_file(tmp_path / "node4.npz", 0, shape=(32, 32))
        supernode("supernode3", 3, "--node-config", f"data-path='{own3}' client-id=3")
        supernode("supernode4", 4, "--node-config", f"data-path='{wrong}' client-id=4")
        run2_start = time.monotonic()
        second = flwr_run(app, tmp_path / "run2", 4, env, deadline)
        timings["run 2"] = time.monotonic() - run2_start
    finally:
        procs.stop()

    left = [pid for pid in procs.seen if running(pid)]
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert not left and str(tmp_path) not in ps, ps

    clients = second["clients"]
    accepted = sorted(c["client_id"] for c in clients if c["status"] == "accepted")
    assert accepted == [0, 2, 3]  # node 1 revoked; node 3 added
    assert {c["node_id"] for c in clients} == {node_ids[i] for i in (0, 2, 3, 4)}
    failed = [c for c in clients if c["status"] == "failed"]
    assert [c["node_id"] for c in failed] == [node_ids[4]]
    assert "device data" in failed[0]["reason"]
    assert "images are 3x32x32 but the run's dataset digits has 1x8x8" in failed[0]["reason"], failed[0]
    assert second["final_accuracy"] >= 0.3
    examples = {c["client_id"]: c["examples"] for c in clients}
    assert examples[3] == len(np.load(own3)["y"])
    for c in first["clients"] + [c for c in clients if c["status"] == "accepted"]:
        # float32 (1, 8, 8) images plus int64 labels, then .npy headers, metadata and metrics
        assert c["array_bytes_up"] == c["images"] * (64 * 4 + 8) > 0
        assert c["bytes_up"] > c["array_bytes_up"] and c["bytes_down"] > 0
    assert first["bytes_up"] == sum(c["bytes_up"] for c in first["clients"])
    assert first["history"][-1]["bytes_up_cum"] == first["bytes_up"]
    assert first["pooled_images"] == sum(c["images"] for c in first["clients"])
    print(f"timings (s): {timings}; accuracy run 1 {first['final_accuracy']:.3f}, "
          f"run 2 {second['final_accuracy']:.3f}; node 4: {failed[0]['reason']}")
