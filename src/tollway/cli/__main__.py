"""``python -m tollway.cli``."""

from tollway.cli import main

raise SystemExit(main())
