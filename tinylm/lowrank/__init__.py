"""Low rank: the factorized layer's parameters, LoRA and PiSSA adapters, and compression by (whitened) SVD."""
