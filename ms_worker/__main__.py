from ms_worker.cli import main

raise SystemExit(main())
