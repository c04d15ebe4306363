"""Key files: the format zbus keygen writes, safe permissions, clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import zbus
from zbus._keys import format_key_file


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_round_trip_and_rotation_order(tmp_path: Path) -> None:
    new, old = zbus.generate_key(), zbus.generate_key()
    text = format_key_file(new, "2026-11") + format_key_file(old, "2026-10")
    ring = zbus.KeyRing.from_file(write(tmp_path / "keys", text))
    assert ring.active_id == "2026-11" and ring.active_key == new  # the first line signs
    assert ring.get("2026-10") == old  # the others still verify


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o620, 0o666])
def test_files_others_can_reach_are_refused(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path / "k", format_key_file(zbus.generate_key()), mode)
    with pytest.raises(zbus.ConfigError, match="chmod 600"):
        zbus.KeyRing.from_file(path)


def test_group_readable_is_allowed(tmp_path: Path) -> None:
    path = write(tmp_path / "k", format_key_file(zbus.generate_key()), 0o640)
    assert zbus.KeyRing.from_file(path).ids() == ["default"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "holds no key"),
        ("# only a comment\n", "holds no key"),
        ("a b c\n", "expected 'KEY_ID HEX'"),
        ("k1 zz\n", "not hexadecimal"),
        (f"k1 {'00' * 32}\nk1 {'11' * 32}\n", "appears twice"),
        ("k1 00ff\n", "at least 16"),
    ],
)
def test_bad_files_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(zbus.ConfigError, match=message):
        zbus.KeyRing.from_file(write(tmp_path / "k", text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(zbus.ConfigError, match="cannot read key file"):
        zbus.KeyRing.from_file(tmp_path / "absent")


def test_key_bytes_never_appear_in_errors_or_repr(tmp_path: Path) -> None:
    key = zbus.generate_key()
    ring = zbus.KeyRing.from_file(write(tmp_path / "k", format_key_file(key, "k1")))
    assert key.hex() not in repr(ring) and key.hex() not in str(ring)
    path = write(tmp_path / "open", format_key_file(key, "k1"), 0o644)
    with pytest.raises(zbus.ConfigError) as err:
        zbus.KeyRing.from_file(path)
    assert key.hex() not in str(err.value)
