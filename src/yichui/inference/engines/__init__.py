"""The inference engines: ``local`` (transformers, models of the registry) and ``upstream``
(OpenAI-compatible servers). Import the one you need: ``local`` pulls in torch when it runs."""
