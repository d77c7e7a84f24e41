"""An LLM inference workbench: combine decoding, KV-cache and weight-compression techniques on a real
model, watch what they do, and keep every run as a trace."""

__version__ = "0.1.0"
