import sys

from qreset.cli import main

sys.exit(main())
