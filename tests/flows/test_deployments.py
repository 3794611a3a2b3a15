"""The deployments' parameter schema (what the UI form renders and the API enforces) and prefect.yaml."""

import json
import os
from pathlib import Path

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
    assert nightly["parameters"]["run"]["fan_out"] == "workers"
    assert "schedules" not in by_name["on-demand"]
    assert by_name["worker"]["entrypoint"] == "flows/chunk.py:stylize_chunk"
    assert by_name["worker"]["work_pool"]["name"] == "nst-gpu"
    assert all(d["enforce_parameter_schema"] for d in spec["deployments"])
