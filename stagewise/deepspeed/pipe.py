"""`deepspeed.pipe`'s names: `from stagewise.deepspeed.pipe import PipelineModule, LayerSpec, TiedLayerSpec`."""

from stagewise.deepspeed.module import LayerSpec, PipeDataParallelTopology, PipelineModule, TiedLayerSpec

__all__ = ["LayerSpec", "PipeDataParallelTopology", "PipelineModule", "TiedLayerSpec"]
