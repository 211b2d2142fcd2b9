"""Ray job entry point for the head sweep: the arguments of `seqsetvae tune`."""

import sys

from seqsetvae.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
