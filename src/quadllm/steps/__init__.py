"""The steps of quantization, one decoder layer at a time: exact transforms, calibration, weight quantization."""
