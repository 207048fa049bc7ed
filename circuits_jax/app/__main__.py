"""`python -m circuits_jax.app ARGS`: the `circuits-jax` command line (as the installed script runs it).

(`python -m circuits_jax.app.cli` works too, but Python warns there that the package imported `cli` first.)
"""

import sys

from .cli import main

sys.exit(main())
