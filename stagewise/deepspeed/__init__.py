"""DeepSpeed's pipeline API on stagewise: a DeepSpeed pipeline script runs with its imports changed.

    import stagewise.deepspeed as deepspeed                 # was: import deepspeed
    from stagewise.deepspeed import PipelineModule          # was: from deepspeed import PipelineModule

and `stagewise run -n 4 script.py` stands in for `deepspeed --num_gpus 4 script.py`. A thin front-end:
`PipelineModule` partitions the layers and builds this rank's stage (`module`), `initialize` reads the
config with DeepSpeed's meaning (`config`) and runs the engine (`engine`) on one `stagewise.Pipeline`.
DeepSpeed itself is neither needed nor imported. docs/deepspeed.md lists what is supported.
"""

from stagewise.deepspeed.config import DeepSpeedConfig, DeepSpeedConfigError
from stagewise.deepspeed.engine import (
    PipelineEngine,
    RepeatingLoader,
    init_distributed,
    initialize,
)
from stagewise.deepspeed.lr_schedules import WarmupCosineLR, WarmupDecayLR, WarmupLR
from stagewise.deepspeed.module import LayerSpec, PipeDataParallelTopology, PipelineModule, TiedLayerSpec

__all__ = [
    "DeepSpeedConfig",
    "DeepSpeedConfigError",
    "LayerSpec",
    "PipeDataParallelTopology",
    "PipelineEngine",
    "PipelineModule",
    "RepeatingLoader",
    "TiedLayerSpec",
    "WarmupCosineLR",
    "WarmupDecayLR",
    "WarmupLR",
    "init_distributed",
    "initialize",
]
