"""``python -m awpfast.landscape``."""
import sys

from .command import main

sys.exit(main())
