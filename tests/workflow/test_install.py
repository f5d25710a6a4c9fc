"""The pinned install (issue 17): requirements/lock.txt is the tested set of versions.

pyproject.toml keeps ranges (for use as a library); the lock pins every package of
`pip install -e ".[test]"`, envs/pipeline.yaml carries the same pins for `--sdm conda`, and the README's
Quickstart and .ci/run install through the lock. Fast: reads files and installed metadata only
(no network, no installs).
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support import ROOT

LOCK = ROOT / "requirements" / "lock.txt"
CONDA_ENV = ROOT / "envs" / "pipeline.yaml"
# the heavy, result-changing packages: pinned and installed wherever the tests run
MUST_PIN = ("torch", "timm", "diffusers", "snakemake", "numpy", "h5py", "opencv-python-headless")


def _lock() -> dict[str, list[Requirement]]:
    """The lock's requirements by normalised name (comments and `# via` annotations skipped).

    A name may have several lines, one per Python/platform fork of the universal resolution
    (e.g. `numpy==A ; python_full_version < '3.12'` and `numpy==B ; python_full_version >= '3.12'`).
    """
    lines = [line.strip() for line in LOCK.read_text().splitlines()]
    by_name: dict[str, list[Requirement]] = {}
    for line in lines:
        if line and not line.startswith("#"):
            req = Requirement(line)
            by_name.setdefault(canonicalize_name(req.name), []).append(req)
    return by_name


def _here(name: str, reqs: list[Requirement]) -> Requirement | None:
    """The line that applies to this interpreter and platform (None: the package is not needed here)."""
    applying = [req for req in reqs if req.marker is None or req.marker.evaluate()]
    assert len(applying) <= 1, f"requirements/lock.txt: several lines for {name} apply here: {applying}"
    return applying[0] if applying else None


def _pin(req: Requirement) -> str:
    """The single `==` version a lock line pins."""
    specs = list(req.specifier)
    assert len(specs) == 1 and specs[0].operator == "==", f"requirements/lock.txt: {req} is not an exact == pin"
    return specs[0].version


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pyproject_deps(extras: bool) -> list[Requirement]:
    project = _pyproject()["project"]
    deps = list(project["dependencies"])
    if extras:
        deps += [d for group in project.get("optional-dependencies", {}).values() for d in group]
    return [Requirement(d) for d in deps]


def _conda_pip_pins() -> tuple[list, list[Requirement]]:
    env = yaml.safe_load(CONDA_ENV.read_text())
    deps = env["dependencies"]
    pip_lists = [d["pip"] for d in deps if isinstance(d, dict) and "pip" in d]
    assert len(pip_lists) == 1, "envs/pipeline.yaml: expected one `pip:` list"
    return deps, [Requirement(line) for line in pip_lists[0]]


def test_lock_pins_exactly_and_matches_the_installed_environment():
    lock = _lock()
    for name in MUST_PIN:
        assert name in lock and _here(name, lock[name]), f"requirements/lock.txt does not pin {name} for this Python"
        assert _installed(name) is not None, f"{name} is pinned but not installed in this environment"
    mismatches = []
    for name, reqs in lock.items():
        pins = [_pin(req) for req in reqs]  # every line an exact pin, whether it applies here or not
        req = _here(name, reqs)
        installed = _installed(name)
        if req is None or installed is None:
            continue
        if installed != _pin(req):
            mismatches.append(f"{name}: installed {installed}, requirements/lock.txt pins {_pin(req)} (all: {pins})")
    assert not mismatches, "the environment is not the locked one:\n" + "\n".join(mismatches)


@pytest.mark.parametrize("extras", [False, True], ids=["runtime", "with-test-extra"])
def test_lock_pins_every_pyproject_dependency_within_its_range(extras):
    lock = _lock()
    for dep in _pyproject_deps(extras):
        name = canonicalize_name(dep.name)  # extras such as snakemake[reports] stripped
        assert name in lock, f"pyproject.toml needs {dep}, requirements/lock.txt does not pin {name}"
        for req in lock[name]:
            pinned = _pin(req)
            assert dep.specifier.contains(pinned, prereleases=True), (
                f"requirements/lock.txt pins {req}, outside pyproject.toml's {dep}"
            )


def test_conda_env_pins_the_lock():
    lock = _lock()
    deps, pins = _conda_pip_pins()
    assert "python=3.11" in deps, f"envs/pipeline.yaml does not pin python=3.11: {deps}"
    assert "pip" in deps, "envs/pipeline.yaml does not list pip"
    listed = set()
    for req in pins:
        name = canonicalize_name(req.name)
        listed.add(name)
        assert name in lock, f"envs/pipeline.yaml pins {name}, requirements/lock.txt does not"
        locked = {(str(r.specifier), str(r.marker)) for r in lock[name]}
        assert (str(req.specifier), str(req.marker)) in locked, (
            f"envs/pipeline.yaml pins {req}, requirements/lock.txt pins {[str(r) for r in lock[name]]}"
        )
    for dep in _pyproject_deps(extras=False):
        assert canonicalize_name(dep.name) in listed, f"envs/pipeline.yaml does not list {dep} (pyproject.toml)"


def _quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README.md: no ```bash block under ## Quickstart"
    return [line for line in block.group(1).splitlines() if line.startswith("pip install")]


def test_readme_quickstart_and_ci_install_through_the_lock():
    commands = _quickstart_commands()
    assert len(commands) == 2, f"README.md Quickstart: expected two `pip install` lines, got {commands}"
    for line in commands:
        assert "-c requirements/lock.txt" in line.split("&&")[0], (
            f"README.md Quickstart line does not install with -c requirements/lock.txt: {line}"
        )
    # .ci/run takes the test command out of the README with a grep: that grep must find the Quickstart line
    ci = (ROOT / ".ci" / "run").read_text()
    grep = re.search(r"grep -m1 -E '([^']+)' README\.md", ci)
    assert grep, ".ci/run: no `grep -m1 -E '...' README.md` for the test command"
    pattern = grep.group(1)
    readme_lines = (ROOT / "README.md").read_text().splitlines()
    found = [line for line in readme_lines if re.search(pattern, line)]
    assert found, f".ci/run greps README.md for {pattern!r}, no README line matches"
    assert found[0] in commands and "pytest" in found[0], (
        f".ci/run's grep {pattern!r} finds {found[0]!r}, not the Quickstart's test line"
    )
