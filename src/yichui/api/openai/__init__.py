"""OpenAI-compatible endpoints: ``router`` (thin), ``protocol`` (schemas), ``serving`` (work)."""
