"""Fine-tuning the full-precision outlier weights (or LoRA): config, loop, job, adapter files, plots."""
