"""``python -m awpfast.train``."""
import sys

from . import main

sys.exit(main())
