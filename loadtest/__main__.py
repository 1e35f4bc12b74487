"""``python -m loadtest replay ...`` / ``python -m loadtest traffic synth ...`` without the onerec CLI."""

from loadtest.cli import main

raise SystemExit(main())
