"""The deployments' parameter schema (what the UI form renders and the API enforces) and prefect.yaml."""

import json
import os
from pathlib import Path

import pytest
import yaml
from prefect.utilities.callables import parameter_schema

from flows.batch import stylize_batch
from flows.chunk import stylize_chunk

SNAPSHOT = Path(__file__).parent / "snapshots" / "stylize_batch.schema.json"
ROOT = Path(__file__).resolve().parents[2]


def current_schema() -> dict:
    return json.loads(json.dumps(parameter_schema(stylize_batch).model_dump_for_openapi()))


def test_parameter_schema_matches_the_snapshot():
    """A change to the UI form shows up here. Regenerate with NST_UPDATE_SNAPSHOTS=1 after review."""
    schema = current_schema()
    if os.environ.get("NST_UPDATE_SNAPSHOTS"):
        SNAPSHOT.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
    assert schema == json.loads(SNAPSHOT.read_text())


def test_form_has_titles_descriptions_dropdowns_and_defaults():
    schema = current_schema()
    style = schema["definitions"]["StyleParams"]["properties"]
    assert style["iterations"]["title"] == "Iterations" and style["iterations"]["minimum"] == 1
    assert style["style_weight"]["title"] == "Style weight" and style["style_weight"]["description"]
    assert style["optimizer"]["enum"] == ["lbfgs", "adam"]
    assert style["preserve_color"]["enum"] == ["none", "luminance", "histogram"]
    run = schema["definitions"]["RunOptions"]["properties"]
    assert run["fan_out"]["enum"] == ["local", "workers"] and run["max_failures"]["default"] == 0
    assert schema["properties"]["params"]["default"]["iterations"] == 300
    assert schema["required"] == ["source", "output"]
    assert "content/style pairs" in schema["properties"]["source"]["description"]


def test_form_titles_read_as_words_not_parameter_names():
    """Old form: raw `source`, `params (Optional)`; now every group has a title a person understands."""
    props = current_schema()["properties"]
    titles = {name: p["title"] for name, p in props.items()}
    assert titles == {"source": "Images to stylize", "output": "Where results go", "params": "Style settings",
                      "run": "Run settings"}
    assert [n for n, _ in sorted(props.items(), key=lambda kv: kv[1]["position"])] == ["source", "output", "params",
                                                                                        "run"]


def test_source_is_a_choice_of_kind_with_plain_text_fields():
    """Old form: one object with three `str | None` toggles; now a prefixes|manifest choice (anyOf,
    which the UI renders as a picker) whose fields are required plain strings."""
    schema = current_schema()
    source = schema["properties"]["source"]
    assert [m["$ref"] for m in source["anyOf"]] == ["#/definitions/PrefixSource", "#/definitions/ManifestSource"]
    prefixes, manifest = schema["definitions"]["PrefixSource"], schema["definitions"]["ManifestSource"]
    for model, kind in ((prefixes, "prefixes"), (manifest, "manifest")):  # kind: accepted and checked, not shown
        assert "kind" not in model["properties"] and "^kind$" in model["patternProperties"]
        assert model["not"] == {"required": ["kind"], "properties": {"kind": {"not": {"const": kind}}}}
    assert set(prefixes["required"]) == {"contents", "styles"} and manifest["required"] == ["manifest"]
    for model in (prefixes, manifest):
        for field in model["properties"].values():
            assert "anyOf" not in field and field.get("type") == "string", field


def test_source_kind_is_inferred_or_given():
    from tasks.models import BatchSource, ManifestSource, PrefixSource

    assert isinstance(BatchSource(contents="c/", styles="s/"), PrefixSource)
    assert isinstance(BatchSource(manifest="m.jsonl"), ManifestSource)
    assert isinstance(BatchSource.validate({"kind": "manifest", "manifest": "m.csv"}), ManifestSource)
    with pytest.raises(ValueError):
        BatchSource(kind="prefixes", manifest="m.jsonl")


@pytest.mark.parametrize("source, output", [
    ({"kind": "prefixes", "contents": "   ", "styles": "s3://b/s/"}, {"uri": "s3://b/out/"}),
    ({"kind": "prefixes", "contents": "s3://b/c/ ", "styles": "s3://b/s/"}, {"uri": "s3://b/out/"}),
    ({"kind": "prefixes", "contents": "s3://b/c/", "styles": "s3://b/s/"}, {"uri": " "}),
    ({"kind": "manifest", "manifest": "s3://b/pairs/"}, {"uri": "s3://b/out/"}),
    ({"kind": "manifest", "manifest": "s3://b/in/photo.png"}, {"uri": "s3://b/out/"}),
    ({"kind": "manifest", "manifest": "s3://b/pairs.json"}, {"uri": "s3://b/out/"}),
])
def test_values_the_flow_cannot_run_are_refused_by_the_api_schema_and_by_the_flow(source, output):
    """Old schema: minLength 1 only, so the API accepted a blank or space-padded prefix and a
    manifest that is a folder or an image; the run then failed on a worker. Now the schema the
    API enforces refuses them, and the flow's own entry check says why in one line."""
    from prefect.utilities.schema_tools.validation import validate

    from tasks.models import InvalidInputs, batch_inputs

    assert validate({"source": source, "output": output}, current_schema()), (source, output)
    with pytest.raises(InvalidInputs) as err:
        batch_inputs(source, output, {}, {})
    assert "\n" not in str(err.value) and ("must" in str(err.value)), str(err.value)
    ok = {"kind": "manifest", "manifest": "s3://b/My Pairs.CSV"}
    assert not validate({"source": ok, "output": {"uri": "s3://b/out/"}}, current_schema())


@pytest.mark.usefixtures("prefect_api")
def test_a_run_that_skipped_the_api_schema_check_fails_at_once_with_one_line():
    """A run created with "Validate parameters" unticked reaches the flow with raw values. Old code:
    Prefect's own check failed it with a multi-line pydantic dump; now the flow's first step does,
    in one line that names each bad field, before any storage or weights are touched."""
    state = stylize_batch(source={"contents": "s3://b/c/"}, output={"uri": ""},
                          params={"style_layers": ["relu9_9"]}, run={}, return_state=True)
    assert state.is_failed()
    message = state.message
    assert message.startswith("invalid parameters: ") and "\n" not in message, message
    for part in ("source.styles: Field required", "output.uri", "params.style_layers", "relu9_9"):
        assert part in message, message


def test_chunk_flow_takes_planned_pairs():
    schema = json.loads(json.dumps(parameter_schema(stylize_chunk).model_dump_for_openapi()))
    assert set(schema["required"]) == {"pairs", "output", "params", "run", "weights_id", "report_key"}


def test_prefect_yaml_declares_the_three_deployments():
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert set(by_name) == {"nightly", "on-demand", "worker"}
    nightly = by_name["nightly"]
    assert nightly["entrypoint"] == "flows/batch.py:stylize_batch" and nightly["work_pool"]["name"] == "nst-control"
    assert nightly["schedules"][0]["cron"] == "0 2 * * *" and nightly["schedules"][0]["timezone"]
    assert nightly["schedules"][0]["active"] is False  # its parameters are placeholders
    assert nightly["parameters"]["source"]["kind"] == "prefixes"
    assert nightly["parameters"]["run"]["fan_out"] == "workers"
    assert "schedules" not in by_name["on-demand"]
    assert by_name["worker"]["entrypoint"] == "flows/chunk.py:stylize_chunk"
    assert by_name["worker"]["work_pool"]["name"] == "nst-gpu"
    assert all(d["enforce_parameter_schema"] for d in spec["deployments"])


def test_prefect_yaml_gives_workers_their_storage_environment_without_secrets():
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    for d in spec["deployments"]:
        env = d["work_pool"]["job_variables"]["env"]
        assert env["AWS_REQUEST_CHECKSUM_CALCULATION"] == "when_required"
        assert not [k for k in env if any(w in k for w in ("KEY", "SECRET", "TOKEN", "PASSWORD"))], env


def test_prefect_yaml_leaves_the_endpoint_and_region_to_each_workers_environment(monkeypatch):
    """A flow run's environment is the worker's, overridden by the deployment's env. The yaml set
    AWS_ENDPOINT_URL_S3 from the shell that ran `prefect deploy`: deployed from a shell without it,
    every run got "", which botocore skips, so a worker's own MinIO endpoint was hidden and the runs
    went to AWS; and a fixed region overrode each worker's. Rendered as `prefect deploy` renders it."""
    from prefect.utilities.templating import apply_values

    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    for d in spec["deployments"]:
        env = apply_values(apply_values(d["work_pool"]["job_variables"]["env"], os.environ, remove_notset=False),
                           {}, warn_on_notset=False)
        assert all(value for value in env.values()), env  # "" hides the worker's own value from boto3
        assert not {"AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION"} & env.keys(), env


def _server_refusal(parameters: dict) -> str:
    """What the Prefect server answers (409 detail) when a run's parameters break the deployment's
    schema: the same check, the same message (prefect.server.api.deployments.create_flow_run...)."""
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    with pytest.raises(ValidationError) as err:
        validate(parameters, current_schema(), raise_on_error=True)
    return str(err.value)


@pytest.mark.parametrize("source, field", [
    ({"contents": "", "styles": "s3://b/s/"}, "source.contents"),
    ({"kind": "prefixes", "contents": "", "styles": "s3://b/s/"}, "source.contents"),
    ({"kind": "prefixes", "contents": "s3://b/c/", "styles": ""}, "source.styles"),
    ({"kind": "manifest", "manifest": ""}, "source.manifest"),
])
def test_the_servers_refusal_of_an_empty_field_names_it(source, field):
    """Old: "Validation failed for field 'source'. Failure reason: {...} is not valid under any of
    the given schemas" (and 'source.kind': "'prefixes' was expected" for an empty manifest)."""
    message = _server_refusal({"source": source, "output": {"uri": "s3://b/o/"}, "params": {"iterations": 0}})
    assert f"field '{field}'" in message and "must not be empty" in message, message
    message = _server_refusal({"source": {"contents": "s3://b/c/", "styles": "s3://b/s/"}, "output": {"uri": ""}})
    assert "field 'output.uri'" in message and "must not be empty" in message, message


def test_the_schema_still_refuses_what_the_flow_refuses():
    from prefect.utilities.schema_tools.validation import validate

    ok = {"output": {"uri": "s3://b/o/"}}
    for bad in ({"kind": "manifest", "contents": "s3://b/c/", "styles": "s3://b/s/"},
                {"kind": "other", "contents": "s3://b/c/", "styles": "s3://b/s/"},
                {"kind": "prefixes", "manifest": "s3://b/m.csv"},
                {"contents": " s3://b/c/", "styles": "s3://b/s/"}):
        assert validate({"source": bad, **ok}, current_schema()), bad
    for good in ({"contents": "s3://b/c/", "styles": "s3://b/s/"}, {"kind": "manifest", "manifest": "s3://b/m.csv"},
                 {"kind": "prefixes", "contents": "s3://b/c/", "styles": "s3://b/s/", "pairing": "zip"}):
        assert not validate({"source": good, **ok}, current_schema()), good


def _properties(schema: dict):
    for name, model in schema["definitions"].items():
        for field, prop in model.get("properties", {}).items():
            yield f"{name}.{field}", prop


def test_the_form_shows_only_what_a_person_can_change_in_one_line_each():
    """Old form: a "Source kind — const and cannot be changed" box, "Property is type None" toggles
    (anyOf with null), "(advanced) (Optional)" labels and paragraph-long descriptions."""
    schema = current_schema()
    for name, prop in _properties(schema):
        assert "const" not in prop, name  # nothing the person cannot change
        assert not any(m.get("type") == "null" for m in prop.get("anyOf", [])), name  # no None toggle
        assert "(advanced)" not in prop["title"], name
        assert len(prop.get("description", "")) <= 100 and "\n" not in prop.get("description", ""), name
    for name, prop in schema["properties"].items():
        assert len(prop["description"]) <= 100 and "(advanced)" not in prop["title"], name
    for name, model in schema["definitions"].items():
        assert len(model.get("description", "")) <= 100 and "\n" not in model.get("description", ""), name
    run = list(schema["definitions"]["RunOptions"]["properties"])
    assert run[:3] == ["fan_out", "max_failures", "chunk_size"], run  # the everyday run settings first


def test_production_deployments_send_work_to_the_gpu_pool_by_default():
    """Old on-demand: no parameters, so fan_out defaulted to local and a run started with only the
    required fields stylized on the light control pool."""
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    for name in ("nightly", "on-demand"):
        assert by_name[name]["work_pool"]["name"] == "nst-control"
        assert by_name[name]["parameters"]["run"]["fan_out"] == "workers", name
        chunk = by_name[name]["parameters"]["run"].get("chunk_deployment", "stylize-chunk/worker")
        assert chunk == "stylize-chunk/" + by_name["worker"]["name"] and by_name["worker"]["work_pool"]["name"] == "nst-gpu"


def test_the_nightly_description_says_when_in_which_timezone():
    """The UI shows the schedule as "At 02:00 AM every day" without its timezone."""
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    nightly = next(d for d in spec["deployments"] if d["name"] == "nightly")
    minute, hour = nightly["schedules"][0]["cron"].split()[:2]
    assert f"{int(hour):02d}:{int(minute):02d} {nightly['schedules'][0]['timezone']}" in nightly["description"]


def test_no_field_renders_as_a_const_box():
    """A ``Literal["auto"] | int`` field's schema had a ``const`` member, which the run form shows as
    "const and cannot be changed" (CI's headless-Chromium test caught it); each is a one-choice enum."""
    schema = current_schema()
    for model in schema["definitions"].values():
        for name, prop in model.get("properties", {}).items():
            assert all("const" not in member for member in prop.get("anyOf", [])), name
    assert schema["definitions"]["RunOptions"]["properties"]["pairs_per_step"]["anyOf"][0]["enum"] == ["auto"]


def test_every_deploy_command_shown_runs_without_prompts():
    """`prefect deploy` without --no-prompt asks, per deployment, whether to set up remote code
    storage and schedules; Enter starts those wizards. Every command the README and the yaml show
    says --no-prompt."""
    import re

    shown = [line for path in (ROOT / "README.md", ROOT / "deployments" / "prefect.yaml")
             for line in path.read_text().splitlines() if re.search(r"prefect\b.*\bdeploy --prefect-file", line)]
    assert len(shown) >= 3
    assert all("prefect --no-prompt deploy" in line for line in shown), shown
