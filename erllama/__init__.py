"""erllama: a supervised llama.cpp inference daemon with a token-exact KV-state cache."""

__version__ = "0.1.0"
