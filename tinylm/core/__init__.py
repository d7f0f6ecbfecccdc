"""The reading path in plain NumPy: layers, gpt2 and llama (the models), optim (AdamW), muon, polar, sampling."""
