"""The batch parameters: pydantic models the Prefect UI renders as a grouped form.

Imports no torch, so deployments and forms load fast. StyleParams lives in nst_core.params; the
flow's form shows it through ``StyleForm``. ``form_schema`` shapes every model's JSON schema
for a person and for the server's refusals (the pydantic validation is unchanged).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, GetCoreSchemaHandler,
                      GetJsonSchemaHandler, Tag, TypeAdapter, field_validator)
from pydantic_core import CoreSchema

from nst_core.params import Device, StyleParams, device_name
from nst_core.uris import host_problem, parse_uri

__all__ = ["BatchSource", "PrefixSource", "ManifestSource", "OutputSpec", "RunOptions", "StyleForm", "form_schema",
           "batch_inputs", "InvalidInputs"]


#: A required text field still shows in the form's starting value (as ""), so the form can tell
#: which source kind a value is: the Prefect UI matches a value to the anyOf member sharing the
#: most keys (``kind`` is not shown, see ``form_schema``). The API still refuses "".
_EMPTY_IN_FORM = {"default": ""}
#: What the server says about an empty required text: jsonschema's ``not`` message repeats its
#: schema ("'' should not be valid under {'description': 'must not be empty', 'maxLength': 0}").
_NOT_EMPTY = {"description": "must not be empty", "maxLength": 0}


def form_schema(schema: dict[str, Any], cls: type | None = None) -> None:
    """Shape a model's JSON schema for the Prefect run form and the server's refusals, in place.

    - A constant member of a field's union (``Literal["auto"] | int``) shows as a one-choice select.
    - A constant (a union member's ``kind``) cannot change, so the form does not show it: it
      leaves ``properties`` for ``patternProperties`` (accepted, not rendered) and the member
      refuses another value with a ``not`` at its own level, so that the server's message names
      the bad field of the member the value meant, not the other member's ``kind``.
    - Optional values (``X | None``) show as a plain X input, not a "None" toggle: unset is None,
      and the server's schema preprocessing still accepts an explicit null.
    - An empty required text (minLength 1) fails ONE keyword, ``not`` with "must not be empty"
      (jsonschema reports the anyOf itself when two keywords tie on one field), and a pattern
      lets "" through to it.
    - The model's description is its docstring's first paragraph: one line in the form.
    """
    constants = []
    for name, prop in list(schema.get("properties", {}).items()):
        if "const" in prop:
            del schema["properties"][name]
            schema.setdefault("patternProperties", {})[f"^{re.escape(name)}$"] = {}
            constants.append({"required": [name], "properties": {name: {"not": {"const": prop["const"]}}}})
            continue
        members = prop.get("anyOf", [])
        for member in members:  # "auto" | N: a one-choice select, not a const box the form cannot change
            if "const" in member:
                member["enum"] = [member.pop("const")]
        if len(members) == 2 and {"type": "null"} in members:
            prop.pop("anyOf")
            prop.update(next(m for m in members if m != {"type": "null"}))
            if prop.get("default", ...) is None:
                del prop["default"]
        if prop.get("type") == "string" and prop.get("minLength") == 1:
            del prop["minLength"]
            prop["not"] = dict(_NOT_EMPTY)
            if "pattern" in prop and not re.search(prop["pattern"], ""):
                prop["pattern"] = f"^$|{prop['pattern']}"
    if constants:
        schema["not"] = constants[0] if len(constants) == 1 else {"anyOf": constants}
    if schema.get("description"):
        schema["description"] = " ".join(schema["description"].split("\n\n")[0].split())


class _FormSchema:
    """``Annotated[Model, _FormSchema()]``: ``form_schema`` applied to a model defined elsewhere."""

    def __get_pydantic_json_schema__(self, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> dict:
        schema = handler(core_schema)
        form_schema(handler.resolve_ref_schema(schema))
        return schema


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


#: A Prefect block document's name (prefect.types.names.BlockDocumentName), or "" for none.
_BLOCK_NAME = r"^[a-z0-9-]*$"


def _block_name(value: str) -> str:
    """An AwsCredentials block's name; never quoted back: keys pasted into the field went into the
    run's logs, state and UI through "no block named '{…}'"."""
    _trimmed(value)
    if not re.fullmatch(_BLOCK_NAME, value):
        raise ValueError("must be the name of an AwsCredentials block (lowercase letters, digits and dashes), "
                         "never the keys themselves")
    return value


def _place_uri(value: str) -> str:
    """A folder, ``file:`` URI or ``s3://bucket/prefix``, refused here rather than by the storage
    mid-run (which was a traceback): a file URI naming a host, an s3 URI with no bucket, another scheme."""
    _trimmed(value)
    scheme, bucket, path = parse_uri(value)
    if "\0" in value or "\0" in path:  # raw, or %00 in a file URI: "embedded null byte" at the first read
        raise ValueError("must not hold a NUL character")
    if scheme == "s3" and not bucket:
        raise ValueError(f"{value} names no bucket; use s3://bucket/prefix")
    from tasks.storage import is_bucket  # boto3's rule lives with the storage; imported when a URI is checked

    if scheme == "s3" and bucket.endswith(":accesspoint"):  # "arn:...:accesspoint/name": the name went to the key
        raise ValueError(f"{value}: write an access point ARN as arn:aws:s3:REGION:ACCOUNT:accesspoint:NAME "
                         "(a ':' before its name: '/' starts the prefix)")
    if scheme == "s3" and not is_bucket(bucket):  # boto3 checks only at the call, in two lines of regexes
        raise ValueError(f"{value}: {bucket!r} is not an S3 bucket name (letters, digits, '.', '-', '_') "
                         "or access point ARN")
    if why := host_problem(value):
        raise ValueError(why)
    if scheme not in ("", "s3", "file") and len(scheme) > 1:  # one letter: a Windows drive
        raise ValueError(f"{value}: unsupported scheme {scheme!r}; use s3://bucket/prefix or a folder")
    return value


def _manifest_name(value: str) -> str:
    _place_uri(value)
    if not re.search(r"\.(jsonl|ndjson|csv)$", value, re.IGNORECASE):
        raise ValueError("must name a .jsonl, .ndjson or .csv file (a manifest, not a folder or an image)")
    return value


def _place(value: str) -> str:
    """An allowed source: "" (or a NUL) would allow the worker's working folder (or nothing)."""
    if not value:
        raise ValueError("must not be empty (it would allow the worker's working folder)")
    if "\0" in value:
        raise ValueError("must not hold a NUL character")
    return _trimmed(value)


_Uri = Annotated[str, AfterValidator(_place_uri)]
_Place = Annotated[str, AfterValidator(_place), Field(min_length=1, json_schema_extra={"pattern": _TRIMMED})]
_DeviceName = Annotated[Device, BeforeValidator(device_name)]  # type: ignore[valid-type]
_ManifestUri = Annotated[str, AfterValidator(_manifest_name)]


class PrefixSource(BaseModel):
    """Content images and style images, each under a prefix or in a folder."""

    model_config = ConfigDict(extra="forbid", title="Content and style prefixes", json_schema_extra=form_schema)

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

    model_config = ConfigDict(extra="forbid", title="Manifest", json_schema_extra=form_schema)

    kind: Literal["manifest"] = Field(default="manifest", title="Source kind")
    manifest: _ManifestUri = Field(
        min_length=1, title="Manifest URI",
        description="A .jsonl or .csv file of pairs: content, style, optional output name (README: Sources).",
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

    model_config = ConfigDict(extra="forbid", title="Output", json_schema_extra=form_schema)

    uri: _Uri = Field(
        min_length=1, title="Output URI",
        description="s3://bucket/prefix/ or folder. Images, sidecars and run reports are written under it only.",
        json_schema_extra={"pattern": _TRIMMED},
    )
    format: Literal["jpeg", "png", "webp"] = Field(default="jpeg", title="Format", description="Output image format.")
    quality: int = Field(default=92, ge=1, le=100, title="Quality", description="JPEG/WebP quality (1-100).")
    link_expiry_hours: int = Field(
        default=7 * 24, ge=1, le=7 * 24, title="Link expiry (hours)",
        description="How long artifact S3 links work (S3's maximum: 168 h); temporary credentials end them sooner.",
    )
    storage_credentials: Annotated[str, AfterValidator(_block_name)] = Field(
        default="", json_schema_extra={"pattern": _BLOCK_NAME}, title="Storage credentials block",
        description="A Prefect AwsCredentials block for every s3:// read and write; empty: boto3's default chain.",
    )


class RunOptions(BaseModel):
    """How the run is executed and judged."""

    model_config = ConfigDict(extra="forbid", title="Run options", json_schema_extra=form_schema)

    fan_out: Literal["local", "workers"] = Field(
        default="local", title="Fan-out",
        description="workers: one stylize-chunk run per chunk on the GPU pool; local: in this run's process.",
    )
    max_failures: int = Field(
        default=0, ge=0, title="Max failures",
        description="The run ends Failed when more pairs than this fail; the others are written either way.",
    )
    chunk_size: int = Field(
        default=50, ge=1, le=10_000, title="Chunk size", description="Pairs per stylize-chunk run (fan-out: workers)."
    )
    skip_existing: bool = Field(
        default=True, title="Skip existing",
        description="Skip pairs whose image and sidecar already match this run's inputs, params and format.",
    )
    devices: list[_DeviceName] = Field(
        default_factory=lambda: ["auto"], min_length=1, title="Devices",
        description="Devices to use, one step of pairs each at a time; auto: every visible GPU, else MPS, else CPU.",
    )
    pairs_per_step: Literal["auto"] | int = Field(
        default="auto", title="Pairs per device step",
        description="Pairs of one output size optimized together per device step; auto: by GPU memory, 1 on CPU.",
    )
    pair_timeout_s: float | None = Field(
        default=None, gt=0, title="Pair time limit (s)",
        description="A pair whose stylization runs longer than this fails alone (checked between loss evaluations).",
    )
    chunk_timeout_s: float = Field(
        default=6 * 3600, gt=0, title="Chunk deadline (s)",
        description="Fan-out workers: a chunk run not finished this long after it starts is cancelled.",
    )
    window: int = Field(
        default=16, ge=1, le=1024, title="Pairs in flight",
        description="At most this many pairs are downloaded/stylized/uploaded at once (bounds memory).",
    )
    io_workers: int = Field(default=8, ge=1, le=64, title="IO workers", description="Concurrent downloads/uploads.")
    contact_sheet_rows: int = Field(
        default=24, ge=0, le=200, title="Contact sheet rows", description="Pairs shown on the contact sheet (0: none)."
    )
    allowed_sources: list[_Place] = Field(
        default_factory=list, title="Allowed sources",
        description="Prefixes or folders inputs may come from; empty: the source's own, or the manifest's folder.",
    )
    chunk_deployment: str = Field(
        default="stylize-chunk/worker", pattern=r"^[^/]+/[^/]+$", title="Chunk deployment",
        description="Deployment that runs the chunks (fan-out: workers), as flow/deployment.",
    )
    labels: dict[str, str] = Field(
        default_factory=dict, title="Labels", description="Extra key/value notes recorded in every sidecar and the report."
    )


    @field_validator("devices")
    @classmethod
    def _auto_alone(cls, v: list[str]) -> list[str]:
        if "auto" in v and len(v) > 1:
            raise ValueError("'auto' means every device; give it alone or name the devices")
        return v

    @field_validator("pairs_per_step")
    @classmethod
    def _pairs_per_step(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("pairs_per_step must be at least 1 (or auto)")
        return v


#: StyleParams as the run form shows it (``form_schema``; the model itself lives in nst_core).
StyleForm = Annotated[StyleParams, _FormSchema()]


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
    if not problems and len(models[2].style_blend_weights or []) > 1:  # blending is for `nst stylize`
        problems.append("params.style_blend_weights: a batch pair has one style image; give one weight or none")
    if problems:
        raise InvalidInputs(format_validation_error(problems))
    return tuple(models)
