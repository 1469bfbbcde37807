"""jlora: LoRA for JAX/Flax as a pure pytree transform.

The whole train path, in four modules:

* ``transform.init`` adds ``lora_a``/``lora_b`` (and ``lora_scale``) beside kernels;
* ``apply.lora`` runs unmodified model code with them, factored;
* ``optim.optimizer`` and ``optim.train_step`` move the adapter leaves only;
* ``merge.merge`` folds them back in.
"""

from jlora import analysis
from jlora.apply import LoraFallbackWarning, lora
from jlora.config import LoraConfig
from jlora.merge import deltas, merge, unmerge
from jlora.optim import freeze, optimizer, train_step, trainable_mask
from jlora.partition import combine, partition
from jlora.summary import ParamCount, adapter_bytes, count_params, summary
from jlora.transform import init
from jlora.tree import Adapter, adapters

__version__ = "0.1.0"

__all__ = [
    "Adapter", "LoraConfig", "LoraFallbackWarning", "ParamCount", "adapter_bytes",
    "adapters", "analysis", "combine", "count_params", "deltas", "freeze", "init", "lora",
    "merge", "optimizer", "partition", "summary", "train_step", "trainable_mask",
    "unmerge",
]
