"""stagewise: pipeline-parallel training for PyTorch, with schedules as data."""

from stagewise.version import __version__

__all__ = ["CheckpointError", "GPipe", "Pipeline", "PipelineError", "PeerError", "check", "export", "load_full",
           "spawn", "__version__"]


def __getattr__(name: str):
    # torch is imported only when the runtime is used, so `stagewise simulate` starts fast.
    if name == "GPipe":
        from stagewise.gpipe import GPipe

        return GPipe
    if name == "Pipeline":
        from stagewise.pipeline import Pipeline

        return Pipeline
    if name == "check":  # one call that proves a model and schedule exact (stagewise.parity)
        from stagewise.parity import check

        return check
    if name == "export":  # a checkpoint as a Hugging Face folder (stagewise.to_hf)
        from stagewise.to_hf import export

        return export
    if name == "optim":  # AdamW's decay groups and learning-rate schedules (stagewise.optim)
        import stagewise.optim as optim

        return optim
    if name in ("load_full", "CheckpointError"):
        from stagewise.runtime import checkpoint

        return getattr(checkpoint, name)
    if name in ("PipelineError", "PeerError", "spawn"):
        import stagewise.runtime as runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'stagewise' has no attribute {name!r}")
