"""``python -m zbus``: the same as the ``zbus`` command."""

from zbus.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
