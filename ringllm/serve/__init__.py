"""The `ringllm` command and the launcher of `ringllm serve`: it parses the options, starts the engines, hands the
API workers their settings (one WorkerSettings, app/settings.py) and hosts them with Granian. The serve parent
never imports torch: Granian forks the API workers from it."""
