"""pyproject.toml and environment.yml describe one environment."""

import re
import tomllib

import yaml

from delving.params import PROJECT_ROOT


def _pins(requirements):
    pins = {}
    for req in requirements:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^;\s]+)", req.strip())
        assert m, f"not an exact pin: {req!r}"
        pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def test_pyproject_and_environment_name_the_same_packages_and_versions():
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    pyproject = _pins(project["dependencies"] + project["optional-dependencies"]["dev"])
    env = yaml.safe_load((PROJECT_ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert _pins(pip_section) == pyproject
    assert "python=3.11" in env["dependencies"]


def test_lock_file_agrees_with_the_direct_pins():
    lock = {}
    for line in (PROJECT_ROOT / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            lock[name.lower().replace("_", "-")] = version.strip()
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    for name, version in _pins(project["dependencies"] + project["optional-dependencies"]["dev"]).items():
        assert lock.get(name) == version, f"{name}: pyproject {version}, lock {lock.get(name)}"


def test_installed_versions_are_the_pinned_ones():
    from importlib import metadata
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    for name, version in _pins(project["dependencies"]).items():
        assert metadata.version(name) == version, name
