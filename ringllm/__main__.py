from ringllm.serve.cli import main

raise SystemExit(main())
