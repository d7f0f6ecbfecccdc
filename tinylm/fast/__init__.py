"""What the trainer and the sampler run: core's model made fast (row blocks, in-place passes, recomputation, threads, a KV cache), tested equal to core."""
