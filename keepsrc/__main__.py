from keepsrc.cli import main

raise SystemExit(main())
