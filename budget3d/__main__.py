"""``python -m budget3d ...`` is the ``budget3d`` command."""

from budget3d.cli import main

raise SystemExit(main())
