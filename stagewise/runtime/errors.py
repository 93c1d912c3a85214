"""Errors the runtime raises; each names the stage, micro-batch and action involved."""

from __future__ import annotations


class PipelineError(RuntimeError):
    """A pipelined step failed. `stage`, `microbatch` and `action` say where (None when unknown)."""

    def __init__(self, message: str, *, stage: int | None = None, microbatch: int | None = None,
                 action: str | None = None, rank: int | None = None):
        super().__init__(message)
        self.stage, self.microbatch, self.action, self.rank = stage, microbatch, action, rank


class PeerError(PipelineError):
    """Another rank failed or stopped answering; the message carries its own error when known."""


class TransportTimeout(TimeoutError):
    """A wait on another device took longer than the configured timeout."""
