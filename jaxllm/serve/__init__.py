"""`jaxllm serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over the continuous-batching
engine in `jaxllm.inference.engine`."""
