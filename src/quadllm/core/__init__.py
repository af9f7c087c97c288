"""Pure math on tensors: Hadamard and orthogonal transforms, quantizers, GPTQ (no models, no files)."""
