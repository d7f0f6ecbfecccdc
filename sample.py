"""Sample text from a trained tinylm checkpoint. `python sample.py --help` lists the flags."""
import sys

from tinylm.cli.sample import sample_main

if __name__ == "__main__":
    sys.exit(sample_main())
