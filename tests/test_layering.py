"""The import layers of DESIGN.md hold: ``lint-imports`` keeps every contract in pyproject.toml."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"  # import-linter, from the dev extra


def test_the_contracts_cover_the_layers_flower_and_cycles() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]
    contracts = {c["id"]: c for c in config["contracts"]}
    assert contracts["layers"]["layers"] == ["simulations", "server | client", "privacy", "ddcore"]
    assert contracts["no-flower-in-ddcore"]["forbidden_modules"] == ["flwr"]
    assert set(contracts["acyclic"]["ancestors"]) == set(config["root_packages"])


def test_lint_imports_keeps_every_contract() -> None:
    assert LINT_IMPORTS.exists(), f"{LINT_IMPORTS} is missing: pip install -c constraints.txt -e '.[dev]'"
    result = subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "COLUMNS": "200"})
    report = result.stdout[result.stdout.find("Contracts"):]  # without the logo above it
    assert result.returncode == 0, f"lint-imports broke a contract:\n{report}\n{result.stderr}"
    assert " 0 broken" in report
