"""Train tinylm on a text file. `python train.py --help` lists the flags."""
import sys

from tinylm.cli.train import train_main

if __name__ == "__main__":
    sys.exit(train_main())
