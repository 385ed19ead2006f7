from onepass.cli.main import main

raise SystemExit(main())
