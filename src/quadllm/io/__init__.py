"""Files: the checkpoint format, storage precision, original-model sources, lazy safetensors, atomic files,
memory accounting."""
