"""``python -m lstm_multi.bench``: the same as the ``lstm-multi bench`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
