"""The engine: config, scheduling, KV cache, model execution, sampling."""
