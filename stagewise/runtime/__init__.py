"""The runtime: stages, transports, the executor, launching. Imports torch."""

from stagewise.runtime.errors import PeerError, PipelineError
from stagewise.runtime.launch import spawn

__all__ = ["PeerError", "PipelineError", "spawn"]
