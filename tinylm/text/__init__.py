"""Text in, token ids out: the character tokenizer, byte-level BPE, and reading text files into batches."""
