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


def test_torch_is_never_newer_than_2_14_1():
    _, deps = _pyproject()
    assert "<=2.14.1" in deps["torch"] and "<=0.29.1" in deps["torchvision"]
    env = (ROOT / "environment.yml").read_text()
    assert "pytorch>=2.1,<=2.14.1" in env
    assert "torch==2.14.1" in (ROOT / "Makefile").read_text()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make lab" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
