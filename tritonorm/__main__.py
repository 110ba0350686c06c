"""``python -m tritonorm``: the command line (``tritonorm compare | bench | info``)."""

from .cli import main

raise SystemExit(main())
