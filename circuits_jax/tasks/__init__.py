"""tasks."""

from ._tasks import (single_token_ids as single_token_ids, task_from_prompts as task_from_prompts, IOI_TEMPLATES as IOI_TEMPLATES, NAMES as NAMES, PLACES as PLACES, OBJECTS as OBJECTS, ioi_task as ioi_task, ordinary_tokens as ordinary_tokens, induction_task as induction_task, YEAR_NOUNS as YEAR_NOUNS, greater_than_task as greater_than_task, FACTS as FACTS, factual_recall_task as factual_recall_task, TASKS as TASKS, task as task, KNOWN_TASKS as KNOWN_TASKS, load_task as load_task)
from . import known as known
