"""Files: checkpoints, safetensors, Hugging Face folders. A stranger's file is only data: nothing is unpickled."""
