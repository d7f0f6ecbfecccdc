"""Training: the arguments, the loop, fine-tuning with adapters, and data-parallel training over MPI."""
