"""lm-distillery: distil transformer language models into smaller students."""

__version__ = "0.1.0"
