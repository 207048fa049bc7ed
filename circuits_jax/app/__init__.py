"""app: the `circuits-jax` command line, the IOI main job and the report writer.

`cli.py` holds `main`, `build_parser` and `EXPERIMENTS`; each command lives in its own module,
`_<command>.py`, as `add_<command>(sub)` (its subparser, help and example) and `run_<command>(args)`;
`options.py` holds what the commands share (argument types and checks, the prompt-pair and
`--mesh` options). A run function imports the library inside itself (startup stays fast) and loads
its model through `circuits_jax.models.load` (or `tasks.load_task`, `tasks.known.induction_model`),
looked up at call time and only after every argument has been checked.
"""

from ._ioi_job import (JOB_KS as JOB_KS, ioi_job as ioi_job)
from ._report import (Report as Report, Stages as Stages, top_heads as top_heads)
from . import cli as cli
