"""`python -m jaxturbo.cli`: the same as the `jaxturbo` console script."""

import sys

from jaxturbo.cli import main

sys.exit(main())
