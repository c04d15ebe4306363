"""Key files: the format zbus keygen writes, safe permissions, clear errors."""

from __future__ import annotations

import logging
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


def test_key_bytes_never_reach_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    """Every rejection a consumer logs (at DEBUG, the most verbose), a failing handler's
    traceback included, names key ids only, never key bytes."""
    key, stranger = zbus.generate_key(), zbus.generate_key()
    ring = zbus.KeyRing({"k1": key, "k-old": stranger}, active="k1",
                        exchanges={"billing": "k1"}, publishers={"k-old": "legacy.*"})
    dispatcher = zbus.Dispatcher()

    def broken(delivery: zbus.Delivery) -> None:
        raise RuntimeError("handler failed")

    dispatcher.bind("notifications", "#", broken)
    dispatcher.bind("billing", "#", broken)
    core = zbus.ConsumerCore(dispatcher, ring)
    good = zbus.MessageFactory(ring, "svc")
    forged = zbus.MessageFactory(zbus.KeyRing({"k1": zbus.generate_key()}), "svc")
    unknown = zbus.MessageFactory(zbus.KeyRing({"k9": stranger}), "svc")
    old = zbus.MessageFactory(zbus.KeyRing({"k-old": stranger}), "legacy.a")
    first = good.frames("notifications", "a.b", 1)
    with caplog.at_level(logging.DEBUG, logger="zbus"):
        for frames in (
            first, first,  # delivered (its handler raises), then a replay
            forged.frames("notifications", "a.b", 1),  # bad_signature
            unknown.frames("notifications", "a.b", 1),  # unknown_key
            old.frames("billing", "a.b", 1),  # key_not_allowed
            zbus.MessageFactory(zbus.KeyRing({"k-old": stranger}), "legacy.b").frames(
                "notifications", "a.b", 1),
            [first[0], b"\xc1", first[2]],  # bad_signature (the MAC covers the envelope)
            [b"x"],  # frame_count
        ):
            delivery = core.accept(frames)
            if delivery is not None:
                core.run_handlers(delivery)
    assert set(core.stats.rejected) >= {"replay", "bad_signature", "unknown_key",
                                        "key_not_allowed", "frame_count"}
    assert core.stats.handler_errors >= 1
    logged = caplog.text + "".join(
        str(r.exc_info) for r in caplog.records if r.exc_info is not None)
    for secret in (key, stranger):
        for form in (secret.hex(), repr(secret), secret.hex().upper()):
            assert form not in logged
    assert "k1" in logged or "k9" in logged  # the ids are there: the logs say which key


def test_files_another_user_owns_are_refused(tmp_path: Path) -> None:
    # Issue 14: that user can rewrite the keys (mode 0600 alone said nothing about it).
    path = write(tmp_path / "k", format_key_file(zbus.generate_key()))
    os.chown(path, 1001, 1001)
    with pytest.raises(zbus.ConfigError, match="owned by uid 1001"):
        zbus.KeyRing.from_file(path)


@pytest.mark.parametrize(("owner", "mode"), [(0, 0o1777), (0, 0o777), (0, 0o770), (1001, 0o755)])
def test_files_in_a_directory_others_can_write_are_refused(
        tmp_path: Path, owner: int, mode: int) -> None:
    # Issue 14: whoever writes the directory can swap the file for keys of their own.
    shared = tmp_path / "shared"
    shared.mkdir()
    path = write(shared / "k", format_key_file(zbus.generate_key()))
    os.chown(shared, owner, owner)
    os.chmod(shared, mode)
    with pytest.raises(zbus.ConfigError, match="another user can write"):
        zbus.KeyRing.from_file(path)
