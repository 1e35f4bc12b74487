"""`python -m service ...`: the same commands as `onerec serve` / `onerec features load`."""

from service.cli import main

raise SystemExit(main())
