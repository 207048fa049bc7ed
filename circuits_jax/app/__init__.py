"""app."""

from ._ioi_job import (JOB_KS as JOB_KS, ioi_job as ioi_job)
from ._report import (Report as Report, Stages as Stages, top_heads as top_heads)
from . import cli as cli
