"""`python -m tinylm.exercises`: the grader (tinylm/exercises/grader.py)."""
import sys

from tinylm.exercises.grader import main

sys.exit(main())
