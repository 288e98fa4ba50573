"""yichui (一锤): pull, serve, fine-tune and evaluate LLMs, with Redis as the state bus."""

__version__ = "0.1.0"
