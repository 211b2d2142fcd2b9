"""Ray job entry point for the whole pipeline: the arguments of `seqsetvae run`."""

import sys

from seqsetvae.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
