"""Data: text sources and windows, calibration samples, fine-tuning sets."""
