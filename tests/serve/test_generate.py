"""`ringllm generate` (serve/generate.py) on the demo model: plain and --chat prompts, and a missing model
answered with exit status 2."""


def test_cli_generate_runs(demo_path, capsys):
    from ringllm.serve.cli import main

    assert (
        main(
            [
                "generate",
                "The sea",
                "--model",
                str(demo_path),
                "--max-tokens",
                "5",
                "--device",
                "cpu",
                "--kv-cache-tokens",
                "512",
                "--context-len",
                "128",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    assert "finish_reason: length" in capsys.readouterr().err
    assert main(["generate", "x", "--model", "/no/such/dir", "--device", "cpu"]) == 2
    chat = ["generate", "hi", "--chat", "--model", str(demo_path), "--max-tokens", "3", "--device", "cpu"]
    assert main([*chat, "--kv-cache-tokens", "512", "--context-len", "128"]) == 0  # the demo model's template
