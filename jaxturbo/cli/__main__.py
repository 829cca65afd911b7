"""`python -m jaxturbo.cli`: the same as the `jaxturbo` console script."""

import sys

from jaxturbo.cli import main

if __name__ == "__main__":  # importing this module (e.g. walking the package) runs nothing
    sys.exit(main())
