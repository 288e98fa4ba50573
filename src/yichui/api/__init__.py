"""The HTTP API: ``create_app(settings)`` builds it; ``openai/`` holds the OpenAI-compatible
routes (router, protocol, serving), ``errors`` the one error shape, ``auth`` API keys."""
