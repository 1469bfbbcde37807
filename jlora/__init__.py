"""jlora: LoRA for JAX/Flax as a pure pytree transform.

The whole train path, in four modules:

* ``transform.init`` adds ``lora_a``/``lora_b`` (and ``lora_scale``) beside kernels;
* ``apply.lora`` runs unmodified model code with them, factored;
* ``optim.optimizer`` and ``optim.train_step`` move the adapter leaves only;
* ``merge.merge`` folds them back in.
"""

from jlora import analysis
from jlora.adapter import Adapter, Split, adapters
from jlora.apply import LoraFallbackWarning, lora
from jlora.config import LoraConfig
from jlora.edit import map_adapters, scale
from jlora.merge import deltas, merge, unmerge
from jlora.optim import (optimizer, split_trainable, train_step, trainable_mask,
                         value_and_grad)
from jlora.partition import combine, partition
from jlora.sharding import shardings
from jlora.summary import ParamCount, adapter_bytes, count_params, summary
from jlora.transform import init

__version__ = "0.2.0"

__all__ = [
    "Adapter", "LoraConfig", "LoraFallbackWarning", "ParamCount", "Split", "adapter_bytes",
    "adapters", "analysis", "combine", "count_params", "deltas", "init", "lora",
    "map_adapters", "merge", "optimizer", "partition", "scale", "split_trainable",
    "shardings", "summary", "train_step", "trainable_mask", "unmerge", "value_and_grad",
]
