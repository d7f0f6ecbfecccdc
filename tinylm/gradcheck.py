"""`python -m tinylm.gradcheck`: the command line lives in tinylm/cli/gradcheck.py."""
import sys

from tinylm.cli.gradcheck import main

if __name__ == "__main__":
    sys.exit(main())
