"""Every report says which command at which commit wrote it."""

from __future__ import annotations

import subprocess
import sys
import types

from ddcore.files import environment, provenance, with_provenance


def test_a_module_run_is_recorded_as_its_python_dash_m_command_with_the_commit(monkeypatch) -> None:
    fake_main = types.ModuleType("__main__")
    fake_main.__spec__ = types.SimpleNamespace(name="simulations.compare")
    monkeypatch.setitem(sys.modules, "__main__", fake_main)
    monkeypatch.setattr(sys, "argv", ["/x/simulations/compare.py", "--preset", "fmnist", "--set", "a=b c"])
    got = provenance()
    assert got["command"] == "python -m simulations.compare --preset fmnist --set 'a=b c'"
    head = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True,
                          cwd=__file__.rsplit("/", 2)[0])
    if head.returncode == 0:  # a checkout: the commit is HEAD's (with -dirty when files changed)
        assert got["commit"].startswith(head.stdout.strip())
    report = {"environment": environment("cpu")}
    text = with_provenance("# table\n", report)
    assert text.endswith(f"Written by `{report['environment']['command']}` at commit "
                         f"{report['environment']['commit']}.\n")
    assert with_provenance("# table\n", {}) == "# table\n"
