"""``python -m numlstm``: the command line of ``numlstm.cli``."""

from numlstm.cli import main

raise SystemExit(main())
