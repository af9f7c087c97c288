"""What a QUAD model is made of: its modules, the quantized-linear autograd function, the integer KV cache."""
