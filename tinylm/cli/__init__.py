"""Every command line: train.py, sample.py, analyze.py, and python -m tinylm.export / compress / gradcheck."""
