"""``python -m awpfast.continual``: see ``awpfast.continual.run``."""
import sys

from .run import main

if __name__ == "__main__":
    sys.exit(main())
