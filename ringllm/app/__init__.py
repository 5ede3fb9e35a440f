"""ringllm's HTTP side and command line. Never imports torch: the engine runs in its own process."""
