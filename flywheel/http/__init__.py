"""The HTTP layer: the FastAPI app, the server that runs it, its client. Thin skins over the core."""
