"""``python -m ferrolm`` is the ``ferrolm`` command line."""

from ferrolm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
