from ringllm.app.cli import main

raise SystemExit(main())
