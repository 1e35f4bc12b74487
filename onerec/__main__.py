"""``python -m onerec`` is the ``onerec`` command."""

import sys

from onerec.cli import main

sys.exit(main())
