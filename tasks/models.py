"""The batch parameters: pydantic models the Prefect UI renders as a grouped form.

Imports no torch, so deployments and forms load fast. StyleParams lives in nst_core.params.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, GetCoreSchemaHandler, GetJsonSchemaHandler, Tag, TypeAdapter
from pydantic_core import CoreSchema

__all__ = ["BatchSource", "PrefixSource", "ManifestSource", "OutputSpec", "RunOptions", "batch_inputs", "InvalidInputs"]


#: A required text field still shows in the form's starting value (as ""), so the form can tell
#: which source kind a value is: the Prefect UI matches a value to the anyOf member sharing the
#: most keys, and both members share ``kind``. The API still refuses "" (minLength 1).
_EMPTY_IN_FORM = {"default": ""}

# The API checks only the JSON schema, so what the flow would refuse must be a schema pattern
# too: a blank or space-padded URI ("s3://b/in/ ") names no prefix the run can list.
_TRIMMED = r"^\S(.*\S)?$"
_MANIFEST_NAME = r"^\S(.*\S)?\.([jJ][sS][oO][nN][lL]|[nN][dD][jJ][sS][oO][nN]|[cC][sS][vV])$"


def _trimmed(value: str) -> str:
    if value and not value.strip():
        raise ValueError("must not be blank")
    if value != value.strip():
        raise ValueError("must not start or end with whitespace")
    return value


def _manifest_name(value: str) -> str:
    _trimmed(value)
    if not re.search(r"\.(jsonl|ndjson|csv)$", value, re.IGNORECASE):
        raise ValueError("must name a .jsonl, .ndjson or .csv file (a manifest, not a folder or an image)")
    return value


_Uri = Annotated[str, AfterValidator(_trimmed)]
_ManifestUri = Annotated[str, AfterValidator(_manifest_name)]


class PrefixSource(BaseModel):
    """Content images and style images, each under a prefix or in a folder."""

    model_config = ConfigDict(extra="forbid", title="Content and style prefixes")

    kind: Literal["prefixes"] = Field(default="prefixes", title="Source kind")
    contents: _Uri = Field(
        min_length=1, title="Content images", description="s3://bucket/prefix/ or folder of content images.",
        json_schema_extra={**_EMPTY_IN_FORM, "pattern": _TRIMMED},
    )
    styles: _Uri = Field(
        min_length=1, title="Style images", description="s3://bucket/prefix/ or folder of style images.",
        json_schema_extra={**_EMPTY_IN_FORM, "pattern": _TRIMMED},
    )
    pairing: Literal["cross", "zip"] = Field(
        default="cross", title="Pairing",
        description="cross: every content with every style; zip: i-th content with i-th style (sorted, equal counts).",
    )

    @property
    def manifest(self) -> None:
        """No manifest: lets consumers test ``source.manifest`` whatever the kind."""
        return None


class ManifestSource(BaseModel):
    """A JSONL or CSV file listing the pairs."""

    model_config = ConfigDict(extra="forbid", title="Manifest")

    kind: Literal["manifest"] = Field(default="manifest", title="Source kind")
    manifest: _ManifestUri = Field(
        min_length=1, title="Manifest URI",
        description=(
            "URI of a JSONL ({\"content\", \"style\", \"output\"?} per line) or CSV (header content,style[,output]) "
            "manifest; entries are URIs or keys relative to the manifest's folder."
        ),
        json_schema_extra={**_EMPTY_IN_FORM, "pattern": _MANIFEST_NAME},
    )


def _source_kind(value: Any) -> str | None:
    """The union member a value names: its ``kind``, else inferred from its fields (a manifest key means manifest)."""
    if isinstance(value, dict):
        return value.get("kind") or ("manifest" if "manifest" in value else "prefixes")
    return getattr(value, "kind", None)


_SourceUnion = Annotated[
    Annotated[PrefixSource, Tag("prefixes")] | Annotated[ManifestSource, Tag("manifest")],
    Discriminator(_source_kind, custom_error_type="source_kind",
                  custom_error_message="source kind must be 'prefixes' or 'manifest'"),
]
_SOURCE = TypeAdapter(_SourceUnion)


class BatchSource:
    """Where the pairs come from: ``PrefixSource`` or ``ManifestSource``, told apart by ``kind``.

    As a type (the flow's ``source`` parameter) it is that discriminated union, so the run form
    shows only the fields of the chosen kind. Called, it validates keywords into the member they
    name: ``BatchSource(contents=..., styles=...)`` or ``BatchSource(manifest=...)``.
    """

    def __new__(cls, **fields: Any) -> PrefixSource | ManifestSource:  # type: ignore[misc]
        return _SOURCE.validate_python(fields)

    @classmethod
    def __get_pydantic_core_schema__(cls, source_type: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return handler(_SourceUnion)

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> dict:
        # The Prefect UI's form renders anyOf (a kind picker), not oneOf; the members exclude
        # each other anyway (``kind`` constants, no extra fields), so the meaning is the same.
        schema = handler(core_schema)
        if "oneOf" in schema:
            schema["anyOf"] = schema.pop("oneOf")
        return schema

    @classmethod
    def validate(cls, value: Any) -> PrefixSource | ManifestSource:
        return _SOURCE.validate_python(value)


class OutputSpec(BaseModel):
    """Where and how results are written."""

    model_config = ConfigDict(extra="forbid", title="Output")

    uri: _Uri = Field(
        min_length=1, title="Output URI",
        description="s3://bucket/prefix/ or folder. Images, sidecars and run reports are written under it only.",
        json_schema_extra={"pattern": _TRIMMED},
    )
    format: Literal["jpeg", "png", "webp"] = Field(default="jpeg", title="Format", description="Output image format.")
    quality: int = Field(default=92, ge=1, le=100, title="Quality", description="JPEG/WebP quality (1-100).")
    link_expiry_hours: int = Field(
        default=7 * 24, ge=1, le=7 * 24, title="Link expiry (hours)",
        description=(
            "S3 outputs: how long the presigned links in the run's artifacts (contact sheet, loss curve, images, "
            "report) work. 168 hours (7 days) is the most S3 allows."
        ),
    )
    storage_credentials: _Uri = Field(
        default="", json_schema_extra={"pattern": r"^(\S(.*\S)?)?$"}, title="Storage credentials block (advanced)",
        description=(
            "Name of a Prefect AwsCredentials block (prefect-aws) used for every s3:// read and write of the run, "
            "with its endpoint_url for MinIO/Ceph/R2. Empty: boto3's default chain (instance role, ~/.aws, "
            "AWS_* variables)."
        ),
    )


class RunOptions(BaseModel):
    """How the run is executed and judged."""

    model_config = ConfigDict(extra="forbid", title="Run options")

    max_failures: int = Field(
        default=0, ge=0, title="Max failures",
        description="The run ends Failed when more pairs than this fail; the others are written either way.",
    )
    skip_existing: bool = Field(
        default=True, title="Skip existing",
        description=(
            "Skip pairs that are done: image and sidecar exist and the sidecar's key matches this run's "
            "(same inputs, params, weights, format and quality). Reruns redo nothing else."
        ),
    )
    devices: list[str] = Field(
        default_factory=lambda: ["auto"], min_length=1, title="Devices",
        description=(
            "Devices to lease, one stylize task each at a time. 'auto' follows the style params' device: "
            "every visible GPU for auto/cuda, else MPS, else CPU."
        ),
    )
    io_workers: int = Field(default=8, ge=1, le=64, title="IO workers", description="Concurrent downloads/uploads.")
    pair_timeout_s: float | None = Field(
        default=None, gt=0, title="Pair time limit (s)",
        description="A pair whose stylization runs longer than this fails alone (checked between loss evaluations).",
    )
    chunk_timeout_s: float = Field(
        default=6 * 3600, gt=0, title="Chunk deadline (s)",
        description=(
            "fan-out: workers. Chunk runs not finished this long after they were started are cancelled "
            "and their unfinished pairs reported failed (e.g. when no GPU worker is running)."
        ),
    )
    allowed_sources: list[str] = Field(
        default_factory=list, title="Allowed sources",
        description=(
            "URI prefixes / folders the run may read inputs from. Empty: the source's own prefixes, or the "
            "manifest's folder. A manifest entry outside them fails its pair."
        ),
    )
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


class InvalidInputs(ValueError):
    """The flow's arguments do not validate; the message is one line naming every bad field."""


def batch_inputs(source: Any, output: Any, params: Any, run: Any) -> tuple:
    """(source, output, params, run) validated into their models, whatever the caller sent.

    The API checks a deployment's parameters against its schema only when enforcement is on;
    a run created with "Validate parameters" unticked (or by an old client) reaches the flow with
    raw values, so the flow validates them here, on entry, and fails with one line.
    """
    from pydantic import ValidationError
    from pydantic.fields import FieldInfo

    from nst_core.params import StyleParams
    from nst_core.validation import format_validation_error, validation_problems

    problems, models = [], []
    for name, value, kinds, validate in (
        ("source", source, (PrefixSource, ManifestSource), BatchSource.validate),
        ("output", output, OutputSpec, OutputSpec.model_validate),
        ("params", params, StyleParams, StyleParams.model_validate),
        ("run", run, RunOptions, RunOptions.model_validate),
    ):
        try:
            if isinstance(value, FieldInfo):  # the signature's default, when called as .fn
                value = value.get_default(call_default_factory=True)
            models.append(value if isinstance(value, kinds) else validate(value))
        except ValidationError as err:  # the source union's tag is left out: source.styles
            problems += validation_problems(err, name, skip_tags=("prefixes", "manifest") if name == "source" else ())
    if problems:
        raise InvalidInputs(format_validation_error(problems))
    return tuple(models)
