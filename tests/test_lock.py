"""constraints.txt is the lock of the tested environment (written by `make lock`): every package
pinned with ==, every dependency of pyproject.toml in it, and the .venv that `make install` builds
from it holds exactly those versions. Fast and offline: reads files and installed metadata only."""

import re
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "constraints.txt"
IN_VENV = Path(sys.prefix).resolve() == (REPO / ".venv").resolve()
needs_venv = pytest.mark.skipif(
    not IN_VENV, reason="checks the .venv that `make install` builds from the lock"
)


def lock_lines() -> list[tuple[int, str]]:
    out = []
    for no, line in enumerate(LOCK.read_text().splitlines(), 1):
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            out.append((no, line))
    return out


def locked() -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in (Requirement(x) for _, x in lock_lines())}


def pinned_version(req: Requirement) -> str:
    (spec,) = req.specifier
    return spec.version


def project_requirements() -> list[Requirement]:
    """[project] dependencies plus the dev extra of pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    return [Requirement(x) for x in lines]


def applies(req: Requirement, extras: set[str]) -> bool:
    """Whether ``req`` is needed here (its marker evaluated on this interpreter and platform)."""
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": e}) for e in extras | {""})


def required_here() -> tuple[set[str], set[str]]:
    """The distributions this environment needs for pyproject's requirements, following the
    installed packages' metadata with every marker evaluated here: (needed names, of which not
    installed)."""
    todo = [r for r in project_requirements() if applies(r, set())]
    seen: dict[str, set[str]] = {}
    missing: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        extras = {canonicalize_name(e) for e in req.extras}
        if name in seen and extras <= seen[name]:
            continue
        seen.setdefault(name, set()).update(extras)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            missing.add(name)
            continue
        todo += [s for s in map(Requirement, dist.requires or []) if applies(s, seen[name])]
    return set(seen), missing


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def test_every_lock_entry_is_an_exact_pin():
    entries = lock_lines()
    assert len(entries) > 50, "constraints.txt should lock the whole environment: run `make lock`"
    for no, line in entries:
        req = Requirement(line)
        specs = list(req.specifier)
        assert req.url is None and not req.extras, f"constraints.txt:{no}: {line!r}"
        assert len(specs) == 1 and specs[0].operator == "==", f"constraints.txt:{no}: {line!r}"
        assert "*" not in specs[0].version, f"constraints.txt:{no}: {line!r} (wildcard)"
        assert canonicalize_name(req.name) != "pneumoseg", "the project itself is not locked"


def test_lock_has_no_duplicate_names():
    seen: dict[str, int] = {}
    for no, line in lock_lines():
        name = canonicalize_name(Requirement(line).name)
        assert name not in seen, f"{name} pinned twice (constraints.txt lines {seen[name]}, {no})"
        seen[name] = no


def test_lock_header_says_what_it_is_and_how_to_refresh():
    text = LOCK.read_text()
    assert "make lock" in text
    assert re.search(r"^# Tested with \S+ \d+\.\d+\.\d+\S* on \S+\.$", text, re.M)


def test_every_project_dependency_is_pinned_within_its_range():
    lock = locked()
    for req in project_requirements():
        name = canonicalize_name(req.name)
        assert name in lock, f"{req} (pyproject.toml) is not in constraints.txt: run `make lock`"
        version = pinned_version(lock[name])
        assert req.specifier.contains(version, prereleases=True), (
            f"constraints.txt pins {name}=={version}, outside pyproject's {req}: run `make lock`"
        )


@needs_venv
def test_installed_versions_equal_the_lock():
    needed, _ = required_here()
    wrong = []
    for name, req in locked().items():
        have = installed_version(name)
        if have is None:
            # only a package needed on another platform or by another torch build (e.g. the
            # nvidia-* runtime of the CUDA wheel) may be absent
            if name in needed or (req.marker is not None and req.marker.evaluate()):
                wrong.append(f"{name}: not installed, locked {pinned_version(req)}")
        # == ignores a +local label: torch 2.14.1+cu126 satisfies torch==2.14.1
        elif not SpecifierSet(f"=={pinned_version(req)}").contains(have, prereleases=True):
            wrong.append(f"{name}: installed {have}, locked {pinned_version(req)}")
    assert not wrong, "the .venv differs from constraints.txt (run `make install`):\n" + "\n".join(
        wrong
    )


@needs_venv
def test_lock_covers_every_package_needed_here():
    m = re.search(r"^# Tested with \S+ (\d+\.\d+)\.\S+ on (\S+)\.$", LOCK.read_text(), re.M)
    here = (f"{sys.version_info.major}.{sys.version_info.minor}", sysconfig.get_platform())
    if not m or m.groups() != here:
        pytest.skip(f"lock made on {m and m.groups()}, this is {here}: other packages may apply")
    lock = locked()
    for name, req in lock.items():
        have, pin = installed_version(name), pinned_version(req)
        if have not in (None, pin) and SpecifierSet(f"=={pin}").contains(have, prereleases=True):
            pytest.skip(f"another build of {name} ({have}) is installed: its deps are not locked")
    needed, missing = required_here()
    assert not missing, f"needed but not installed: {sorted(missing)} (run `make install`)"
    unlocked = sorted(needed - set(lock))
    assert not unlocked, f"installed but not in constraints.txt: {unlocked}: run `make lock`"
