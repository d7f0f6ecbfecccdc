"""`python -m tinylm.compress`: the command line lives in tinylm/cli/compress.py."""
import sys

from tinylm.cli.compress import main

if __name__ == "__main__":
    sys.exit(main())
