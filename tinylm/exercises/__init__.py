"""Eight exercises graded against tinylm's own functions: README.md says what each asks; python -m tinylm.exercises."""
