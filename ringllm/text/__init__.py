"""Text on both sides of the engine, torch-free and web-free: the tokenizer and its chat template, the
incremental detokenizer, stop strings, and one request's text stream. The API workers (ringllm/app) and the
offline API (ringllm/engine/llm.py) share them."""
