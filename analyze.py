"""Analyze a trained tinylm checkpoint. `python analyze.py --help` lists the options."""
import sys

from tinylm.cli.analyze import analyze_main

if __name__ == "__main__":
    sys.exit(analyze_main())
