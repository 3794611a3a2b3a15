import torch

from flows.demo import EXAMPLES, RANDOM_WEIGHTS_WARNING, demo_inputs


def test_demo_falls_back_to_random_weights_loudly(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    source, output, params, run = demo_inputs(str(tmp_path / "demo-output"))
    assert params.weights == "random"
    assert run.labels["warning"] == RANDOM_WEIGHTS_WARNING  # recorded in every sidecar and the report
    err = capsys.readouterr().err
    assert "WARNING" in err and "RANDOM weights" in err and f"image_size={params.image_size}" in err
    assert source.contents == str(EXAMPLES / "contents") and output.uri.endswith("demo-output")


def test_examples_are_bundled():
    assert len(list((EXAMPLES / "contents").glob("*.png"))) >= 2
    assert len(list((EXAMPLES / "styles").glob("*.png"))) >= 2
