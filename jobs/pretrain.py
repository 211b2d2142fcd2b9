"""Ray job entry point for pretraining: the arguments of `seqsetvae pretrain`."""

import sys

from seqsetvae.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
