"""`python -m mesh.bench flood …`."""

import sys

from mesh.bench.cli import main

sys.exit(main())
