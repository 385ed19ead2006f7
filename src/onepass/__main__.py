from onepass.cli import main

raise SystemExit(main())
