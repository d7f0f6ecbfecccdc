"""`python -m tinylm.export`: the command line lives in tinylm/cli/export.py."""
import sys

from tinylm.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
