import torch

from flows.demo import EXAMPLES, RANDOM_WEIGHTS_WARNING, demo_inputs


def test_demo_falls_back_to_random_weights_loudly(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr("flows.demo.timed_probe", lambda params: (8, 1.0))  # tested below
    source, output, params, run = demo_inputs(str(tmp_path / "demo-output"))
    assert params.weights == "random"
    assert run.labels["warning"] == RANDOM_WEIGHTS_WARNING  # recorded in every sidecar and the report
    err = capsys.readouterr().err
    assert "WARNING" in err and "RANDOM weights" in err and f"image_size={params.image_size}" in err
    assert source.contents == str(EXAMPLES / "contents") and output.uri.endswith("demo-output")


def test_examples_are_bundled():
    assert len(list((EXAMPLES / "contents").glob("*.png"))) >= 2
    assert len(list((EXAMPLES / "styles").glob("*.png"))) >= 2


def test_demo_states_an_estimate_it_measured(tmp_path, monkeypatch, capsys):
    """Old: a fixed "~3 min" claim. Now demo_inputs times a probe on this machine and prints the
    estimate it implies; the estimate scales with the probe's measured seconds."""
    import flows.demo as demo

    monkeypatch.setattr(demo, "timed_probe", lambda params: (8, 2.0))
    _, _, params, _ = demo.demo_inputs(str(tmp_path / "out"))
    err = capsys.readouterr().err
    pairs = len(list((EXAMPLES / "contents").glob("*.png"))) * len(list((EXAMPLES / "styles").glob("*.png")))
    expected = pairs * 2.0 * params.iterations / 8
    shown = f"{expected:.0f} s" if expected < 90 else f"{expected / 60:.1f} min"
    assert f"a timed 8-evaluation probe took 2.0 s here, so {pairs} pairs x {params.iterations} evaluations " \
           f"should take about {shown}" in err


def test_timed_probe_runs_the_real_engine():
    from flows.demo import timed_probe
    from nst_core.params import StyleParams

    evaluations, seconds = timed_probe(StyleParams(weights="random", image_size=48, iterations=20, scales=1, device="cpu"))
    assert evaluations == 2 and 0 < seconds < 60
