from uploads_consumer.cli import main

raise SystemExit(main())
