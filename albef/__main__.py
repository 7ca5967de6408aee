"""`python -m albef <command> ...`: the same as the `albef` command (albef/command.py)."""
import sys

from albef.command import main

sys.exit(main())
