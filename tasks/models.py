"""The batch parameters: pydantic models the Prefect UI renders as a grouped form.

Imports no torch, so deployments and forms load fast. StyleParams lives in nst_core.params.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["BatchSource", "OutputSpec", "RunOptions", "IMAGE_EXTENSIONS"]

#: Files a contents/styles prefix contributes, by extension (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


class BatchSource(BaseModel):
    """Where the pairs come from: a manifest, or two prefixes paired cross or zip."""

    model_config = ConfigDict(extra="forbid", title="Source")

    manifest: str | None = Field(
        default=None, title="Manifest",
        description=(
            "URI of a JSONL ({\"content\", \"style\", \"output\"?} per line) or CSV (header content,style[,output]) "
            "manifest; entries are URIs or keys relative to the manifest's folder. Leave empty to use prefixes."
        ),
    )
    contents: str | None = Field(
        default=None, title="Content images", description="s3://bucket/prefix/ or folder of content images."
    )
    styles: str | None = Field(
        default=None, title="Style images", description="s3://bucket/prefix/ or folder of style images."
    )
    pairing: Literal["cross", "zip"] = Field(
        default="cross", title="Pairing",
        description="cross: every content with every style; zip: i-th content with i-th style (sorted, equal counts).",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> BatchSource:
        if self.manifest and (self.contents or self.styles):
            raise ValueError("give either a manifest or contents + styles, not both")
        if not self.manifest and not (self.contents and self.styles):
            raise ValueError("give a manifest URI, or both contents and styles URIs")
        return self


class OutputSpec(BaseModel):
    """Where and how results are written."""

    model_config = ConfigDict(extra="forbid", title="Output")

    uri: str = Field(
        min_length=1, title="Output URI",
        description="s3://bucket/prefix/ or folder. Images, sidecars and run reports are written under it only.",
    )
    format: Literal["jpeg", "png", "webp"] = Field(default="jpeg", title="Format", description="Output image format.")
    quality: int = Field(default=92, ge=1, le=100, title="Quality", description="JPEG/WebP quality (1-100).")


class RunOptions(BaseModel):
    """How the run is executed and judged."""

    model_config = ConfigDict(extra="forbid", title="Run options")

    max_failures: int = Field(
        default=0, ge=0, title="Max failures",
        description="The run ends Failed when more pairs than this fail; the others are written either way.",
    )
    skip_existing: bool = Field(
        default=True, title="Skip existing", description="Skip pairs whose sidecar already exists (reruns redo nothing)."
    )
    devices: list[str] = Field(
        default_factory=lambda: ["auto"], min_length=1, title="Devices",
        description=(
            "Devices to lease, one stylize task each at a time. 'auto' follows the style params' device: "
            "every visible GPU for auto/cuda, else MPS, else CPU."
        ),
    )
    io_workers: int = Field(default=8, ge=1, le=64, title="IO workers", description="Concurrent downloads/uploads.")
    window: int = Field(
        default=16, ge=1, le=1024, title="Pairs in flight",
        description="At most this many pairs are downloaded/stylized/uploaded at once (bounds memory).",
    )
    contact_sheet_rows: int = Field(
        default=24, ge=0, le=200, title="Contact sheet rows", description="Pairs shown on the contact sheet (0: none)."
    )
    fan_out: Literal["local", "workers"] = Field(
        default="local", title="Fan-out",
        description=(
            "local: stylize in this flow run's process; workers: start one stylize-chunk run per chunk "
            "on the GPU work pool and merge their results."
        ),
    )
    chunk_size: int = Field(
        default=50, ge=1, le=10_000, title="Chunk size", description="Pairs per stylize-chunk run (fan-out: workers)."
    )
    chunk_deployment: str = Field(
        default="stylize-chunk/worker", min_length=3, title="Chunk deployment",
        description="Deployment that runs the chunks (fan-out: workers).",
    )
    labels: dict[str, str] = Field(
        default_factory=dict, title="Labels", description="Extra key/value notes recorded in every sidecar and the report."
    )
