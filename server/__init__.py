"""The serving layer: the asyncio engine loop (and, next, the OpenAI-compatible HTTP app)."""
