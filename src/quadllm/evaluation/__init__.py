"""Measuring models: perplexity and KL, comparison tables, speed, and tasks (lm-eval, GSM8K, HumanEval)."""
