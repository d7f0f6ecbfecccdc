"""Analyze a trained tinylm checkpoint. `python analyze.py --help` lists the options."""
import sys

from tinylm.analysis.cli import analyze_main

if __name__ == "__main__":
    sys.exit(analyze_main())
