"""The reading path in plain NumPy: layers, gpt2 (the model), optim (AdamW), muon, polar, sampling."""
