"""`nst serve`: both flows' deployments served in-process, no work pool needed.

The embedded way to get a UI-triggerable setup on one machine: stylize-batch/on-demand (start
it from the UI's run form; fan_out "workers" sends chunks to the served stylize-chunk/worker).
"""

from __future__ import annotations

from prefect import serve

from flows.batch import stylize_batch
from flows.chunk import stylize_chunk

__all__ = ["deployments", "serve_deployments"]


def deployments():
    """The served deployments, named as in deployments/prefect.yaml; the API enforces their schemas."""
    return [
        stylize_batch.to_deployment(name="on-demand", enforce_parameter_schema=True,
                                    description="Runs started from the Prefect UI's run form."),
        stylize_chunk.to_deployment(name="worker", enforce_parameter_schema=True,
                                    description="One chunk of pairs of a stylize-batch run."),
    ]


def serve_deployments(limit: int | None = None) -> None:
    serve(*deployments(), limit=limit)
