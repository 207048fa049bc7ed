"""patching."""

from ._attribution import (attribution_patch_all as attribution_patch_all, attribution_patch as attribution_patch, integrated_gradients as integrated_gradients, atp_star as atp_star)
from ._plan import (plan_sweep as plan_sweep)
from ._shapley import (ShapleyResult as ShapleyResult, shapley_values as shapley_values)
from ._sweep import (PatchResult as PatchResult, patch_result as patch_result, prepare as prepare, patch_sweep as patch_sweep, patch_set as patch_set, patch_every_head as patch_every_head, patch_every_block as patch_every_block)
