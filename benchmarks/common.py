"""What every benchmark prints first: the machine it ran on."""
import os
import sys

import numpy as np

from tinylm.fast import parallel


def machine_line():
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    b = parallel.openblas()
    return (f"{cpu}, {parallel.usable_cores()} cores; Python {sys.version.split()[0]}, NumPy {np.__version__}; "
            f"BLAS {os.path.basename(b.path) if b.path else 'not found'} ({parallel.blas_thread_count()} threads); "
            f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}")
