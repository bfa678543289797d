"""`python -m broadcaster` is the `promptcast` command."""

from broadcaster.cli import main

raise SystemExit(main())
