"""``python -m lmforge`` is the ``lmforge`` command."""
from lmforge.cli import entry

if __name__ == "__main__":
    entry()
