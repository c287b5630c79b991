"""OpenAI-compatible HTTP API (FastAPI + uvicorn) with continuous batching, and the web chat."""
