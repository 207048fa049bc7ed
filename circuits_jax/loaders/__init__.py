"""Model loaders: GGUF, Hugging Face directories (both ways), penzai models, the default registry."""
