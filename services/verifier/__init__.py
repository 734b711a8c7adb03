"""The verifier service: target model, scheduler and the OpenAI-compatible HTTP API."""
