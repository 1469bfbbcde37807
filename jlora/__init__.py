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
from jlora.checkpoint import Checkpoint, CorruptCheckpointError, load, save
from jlora.config import LoraConfig
from jlora.edit import map_adapters, scale
from jlora.merge import deltas, merge, unmerge
from jlora.mix import mix
from jlora.optim import (optimizer, split_trainable, train_step, trainable_mask,
                         value_and_grad)
from jlora.partition import combine, partition
from jlora.peft import load_peft, save_peft
from jlora.per_example import stack_adapters, unstack_adapters
from jlora.quant import Quantized
from jlora.quantize import quantize
from jlora.sd_lora import load_sd_lora, save_sd_lora
from jlora.sharding import shardings
from jlora.summary import ParamCount, adapter_bytes, count_params, summary
from jlora.transform import init

__version__ = "0.2.0"

__all__ = [
    "Adapter", "Checkpoint", "CorruptCheckpointError", "LoraConfig", "LoraFallbackWarning",
    "ParamCount", "Quantized", "Split", "adapter_bytes", "adapters", "analysis", "combine",
    "count_params", "deltas", "init", "load", "load_peft", "load_sd_lora", "lora",
    "map_adapters", "merge", "mix", "optimizer", "partition", "quantize", "save", "save_peft",
    "save_sd_lora", "scale", "shardings", "split_trainable", "stack_adapters", "summary",
    "train_step", "trainable_mask", "unmerge", "unstack_adapters", "value_and_grad",
]
