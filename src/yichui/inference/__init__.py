"""Inference: engines (local transformers, OpenAI-compatible upstreams), the warm model pool,
the response cache with coalescing, and the service the HTTP API calls."""
