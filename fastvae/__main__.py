from fastvae.cli import main

raise SystemExit(main())
