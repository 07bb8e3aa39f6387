"""Distillation inside loops the lab does not own (``transformers.Trainer``)."""
