"""environment.yml (conda) and pyproject.toml (pip) name the same packages."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
# conda-forge names that differ from PyPI's
CONDA_TO_PYPI = {"pytorch": "torch", "matplotlib-base": "matplotlib"}
CONDA_ONLY = {"python", "pip", "openjdk"}  # the interpreter, pip itself, Java for pycocoevalcap


def _name(spec: str) -> str:
    return re.split(r"[<>=!~\[ ]", spec.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject() -> tuple[set[str], dict[str, str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"]) + [s for extra in project["optional-dependencies"].values() for s in extra]
    return {_name(s) for s in specs}, {_name(s): s for s in project["dependencies"]}


def _environment() -> set[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    names = set()
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            names |= {_name(s) for s in dep["pip"] if not s.startswith("-")}
        else:
            name = _name(dep)
            names.add(CONDA_TO_PYPI.get(name, name))
    return names - CONDA_ONLY


def test_environment_and_pyproject_name_the_same_packages():
    pip_names, _ = _pyproject()
    assert _environment() == pip_names


def test_the_package_keeps_an_existing_torch_and_the_makefile_pins_its_own():
    """pyproject and environment.yml give lower bounds only (a user's newer torch is kept); the
    Makefile's .venv pins torch 2.14.1 so the README's commands never download a new one."""
    _, deps = _pyproject()
    for name in ("torch", "torchvision"):
        assert ">=" in deps[name] and "<" not in deps[name] and "==" not in deps[name], deps[name]
    env = (ROOT / "environment.yml").read_text()
    assert re.search(r"^  - pytorch>=[\d.]+$", env, re.M) and re.search(r"^  - torchvision>=[\d.]+$", env, re.M)
    assert "torch==2.14.1 torchvision==0.29.1" in (ROOT / "Makefile").read_text()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make lab" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and ci.index("make lint") < ci.index("make test")
    assert "ruff check" in (ROOT / "Makefile").read_text()
