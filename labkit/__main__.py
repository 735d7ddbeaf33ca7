from labkit.lab.cli import main

raise SystemExit(main())
