"""What a release carries (issue 18, item 5): an sdist that `tox` can test (tests and their
helpers, docs, tox.ini, the example config, the systemd unit), a wheel that ships the example
config `zbus-proxy --help` points to, a LICENSE and current metadata; and a `--check-config`
that refuses a run directory the proxy could not use."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from zbus_proxy import cli
from zbus_proxy._config import load_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "proxy" / "example.toml"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(sdist, wheel) as `python -m build` makes them: the wheel is built from the sdist,
    so a file the sdist lacks is missing from the wheel too."""
    pytest.importorskip("build", reason="the 'build' package (extra 'test') is not installed")
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    yield sdist, wheel


def test_the_sdist_carries_what_tox_needs_to_test_a_release(dists: tuple[Path, Path]) -> None:
    with tarfile.open(dists[0]) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    wanted = {"tox.ini", "LICENSE", "README.md", "pyproject.toml", "setup.py",
              "proxy/example.toml", "proxy/zbus-proxy.service"}
    wanted |= {str(p.relative_to(ROOT)) for p in ROOT.glob("docs/*.md")}
    wanted |= {str(p.relative_to(ROOT)) for p in ROOT.glob("tests/*.py")}
    wanted |= {str(p.relative_to(ROOT)) for p in ROOT.glob("bench/*.py")}
    assert {"tests/conftest.py", "tests/agents.py", "docs/GUIDE.md"} <= wanted
    assert sorted(wanted - names) == []
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_the_wheel_ships_the_example_config_the_unit_and_the_license(
        dists: tuple[Path, Path]) -> None:
    with zipfile.ZipFile(dists[1]) as wheel:
        names = set(wheel.namelist())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        text = wheel.read(metadata).decode()
        assert wheel.read("zbus_proxy/example.toml") == EXAMPLE.read_bytes()
    assert "zbus_proxy/zbus-proxy.service" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in text
    assert "Classifier: Programming Language :: Python :: 3.10" in text
    assert not re.search(r"^Classifier: License ::", text, re.M)  # the expression replaces it


def test_license_and_metadata() -> None:
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0"  # an SPDX expression, not the deprecated table
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text
    # setuptools takes the expression and license-files from 77 on (PEP 639).
    assert "setuptools>=77" in PYPROJECT["build-system"]["requires"]
    oldest = re.fullmatch(r">=3\.(\d+)", project["requires-python"])
    assert oldest is not None
    assert f"Programming Language :: Python :: 3.{oldest[1]}" in project["classifiers"]
    for url in project.get("urls", {}).values():
        assert url.startswith("https://")


def test_the_readme_install_works_on_an_externally_managed_python() -> None:
    readme = (ROOT / "README.md").read_text()
    first = re.search(r"```sh\n(.*?)```", readme, re.S)
    assert first is not None and "python3 -m venv" in first[1]
    assert "pipx install" in readme and "externally-managed-environment" in readme
    oldest = PYPROJECT["project"]["requires-python"].removeprefix(">=")
    assert f"Python {oldest} or newer" in readme


def zbus_proxy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zbus_proxy", *args], capture_output=True,
                          text=True, timeout=30)


def test_example_config_is_printed_and_the_help_points_to_the_installed_file() -> None:
    proc = zbus_proxy("--example-config")
    assert (proc.returncode, proc.stdout) == (0, EXAMPLE.read_text())
    raw = zbus_proxy("--help").stdout
    assert "--example-config" in " ".join(raw.split())
    # argparse wraps a long installed path (a venv's site-packages) mid-word: rejoin it.
    installed = re.search(r"installed\s+as\s+([^)]+)\)", raw)
    assert installed is not None
    path = re.sub(r"\s+", "", installed[1])
    assert Path(path).read_text() == EXAMPLE.read_text()


def test_the_example_config_shows_the_defaults_but_the_two_its_header_names(
        tmp_path: Path) -> None:
    example = load_config(EXAMPLE, {}).values
    defaults = load_config(None, {}).values
    differ = {key for key in defaults if example[key] != defaults[key]}
    assert differ == {"run_dir", "state_dir"}
    header = EXAMPLE.read_text().split("\n\n", 1)[0]
    assert "except run_dir and state_dir" in header


@pytest.fixture
def place(tmp_path: Path) -> Path:
    """A short private directory to put run directories in."""
    tmp_path.chmod(0o700)
    return tmp_path


def _refused(proc: subprocess.CompletedProcess[str], words: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "config OK" not in proc.stdout
    assert words in " ".join(proc.stderr.split()), proc.stderr


def test_check_config_refuses_a_run_dir_under_a_file(place: Path) -> None:
    (place / "file").write_text("")
    _refused(zbus_proxy("--run-dir", str(place / "file" / "run"), "--check-config"),
             "is not a directory")


def test_check_config_refuses_a_state_dir_under_a_file(place: Path) -> None:
    (place / "file").write_text("")
    _refused(zbus_proxy("--run-dir", str(place / "run"), "--state-dir",
                        str(place / "file" / "state"), "--check-config"),
             "cannot create the state directory")


def test_check_config_refuses_a_run_dir_others_may_write(place: Path) -> None:
    (place / "run").mkdir()
    (place / "run").chmod(0o777)
    _refused(zbus_proxy("--run-dir", str(place / "run"), "--check-config"),
             "writable by group or others")


def test_check_config_refuses_a_symlinked_run_dir(place: Path) -> None:
    (place / "real").mkdir(mode=0o700)
    (place / "run").symlink_to(place / "real")
    _refused(zbus_proxy("--run-dir", str(place / "run"), "--check-config"),
             "is a symlink or not a directory")


def test_check_config_refuses_a_run_dir_this_user_cannot_create(
        place: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    (place / "locked").mkdir(mode=0o500)
    if os.getuid() == 0:  # root may write anywhere: answer as access(2) does for others
        monkeypatch.setattr(cli.os, "access", lambda path, mode: Path(path) != place / "locked")
    assert cli.main(["--run-dir", str(place / "locked" / "run"), "--check-config"]) == 2
    _refused(subprocess.CompletedProcess([], 2, *capsys.readouterr()), "may not write in")


def test_check_config_accepts_a_usable_run_dir_and_makes_nothing(place: Path) -> None:
    (place / "existing").mkdir(mode=0o750)  # as systemd's RuntimeDirectoryMode=0750 makes it
    for run_dir in (place / "existing", place / "new" / "run"):
        proc = zbus_proxy("--run-dir", str(run_dir), "--check-config")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("config OK")
    assert not (place / "new").exists()
