"""models."""

from ._checkpoint import (save as save, restore as restore, save_model as save_model, load_model as load_model, tree_allclose as tree_allclose)
from ._files import (atomic_path as atomic_path, write_text as write_text, write_npz as write_npz)
from ._finite import (NonFiniteWeights as NonFiniteWeights, check_finite as check_finite)
from ._gguf import (FETCH_HINT as FETCH_HINT, load_gguf as load_gguf, gguf_tokenizer as gguf_tokenizer)
from ._hf import (config_from_hf as config_from_hf, llama_blocks as llama_blocks, load_hf as load_hf, export_hf as export_hf, read_json as read_json)
from ._penzai import (from_penzai as from_penzai)
from ._registry import (SMOLLM2_WHEEL as SMOLLM2_WHEEL, SMOLLM2_MEMBER as SMOLLM2_MEMBER, MODELS as MODELS, cache_dir as cache_dir, fetch_wheel as fetch_wheel, smollm2_path as smollm2_path, gemma3_path as gemma3_path, assemble_gguf as assemble_gguf, load as load)
from ._tokenizer import (Tokenizer as Tokenizer)
