"""ringllm: an OpenAI-compatible LLM inference server. `ringllm.engine` runs models (torch), `ringllm.app`
serves HTTP (never torch), `ringllm.ipc` carries messages between their processes (neither)."""
