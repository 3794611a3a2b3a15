import pytest

from flows.demo import EXAMPLES, RANDOM_WEIGHTS_WARNING, demo_inputs


def test_demo_falls_back_to_random_weights_loudly(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr("nst_core.weights._download", offline)
    from flows.demo import Probe

    monkeypatch.setattr("flows.demo.timed_probe", lambda params: Probe(8, 1.0, 0.5, 0.1))  # tested below
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
    """Old: the whole probe's seconds x iterations/probe, so the probe's fixed part (style targets
    at every scale, the final fp32 loss) was multiplied ~10x and the stated duration was several
    times what the demo took. Now only the evaluations scale; targets count once per style."""
    import flows.demo as demo

    probe = demo.Probe(evaluations=10, evaluating_s=2.0, targets_s=3.0, other_s=0.5)
    monkeypatch.setattr(demo, "timed_probe", lambda params: probe)
    _, _, params, _ = demo.demo_inputs(str(tmp_path / "out"))
    err = capsys.readouterr().err
    styles = len(list((EXAMPLES / "styles").glob("*.png")))
    pairs = len(list((EXAMPLES / "contents").glob("*.png"))) * styles
    expected = pairs * (0.5 + 0.2 * params.iterations) + styles * 3.0
    shown = f"{expected:.0f} s" if expected < 90 else f"{expected / 60:.1f} min"
    assert f"a timed 10-evaluation probe took 2.0 s here (+3.0 s style targets, once per style), so {pairs} pairs " \
           f"x {params.iterations} evaluations should take about {shown}" in err
    # the old formula's figure is not what is stated
    old = pairs * (2.0 + 3.0 + 0.5) * params.iterations / 10
    assert (f"{old:.0f} s" if old < 90 else f"{old / 60:.1f} min") not in err.split("should take about")[1].split("(")[0]


def test_timed_probe_runs_the_real_engine_and_splits_its_time():
    from flows.demo import timed_probe
    from nst_core.params import StyleParams

    probe = timed_probe(StyleParams(weights="random", image_size=48, iterations=20, scales=1, device="cpu"))
    assert probe.evaluations == 10  # at least 10, so the coarse-to-fine split rounds like the real run
    assert probe.evaluating_s > 0 and probe.targets_s > 0 and probe.other_s >= 0
    # one pair at the probe's own length is the probe: the parts add back up
    assert probe.estimate(1, 1, probe.evaluations) == pytest.approx(
        probe.evaluating_s + probe.targets_s + probe.other_s)


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_api")
def test_a_refused_demo_exits_2_with_the_reason_in_one_line(tmp_path, monkeypatch, capsys):
    """`nst demo --output` somewhere unwritable: the flow refuses at preflight, and `nst batch` says so in
    one line and exits 2. The demo printed its timings and exited 1, the reason only in Prefect's log."""
    import flows.demo as demo
    from flows.cli import main

    monkeypatch.setattr(demo, "timed_probe", lambda params: demo.Probe(10, 1.0, 0.5, 0.1))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["demo", "--output", str(blocker / "out")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("nst: error:")]
    assert len(errors) == 1 and "preflight failed" in errors[0] and str(blocker) in errors[0], errors


def test_a_demo_without_its_sample_images_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    """An installed wheel has no examples/ folder: `nst demo` ended in IndexError's traceback."""
    import flows.demo as demo
    from flows.cli import main

    monkeypatch.setattr(demo, "EXAMPLES", tmp_path / "no-examples")
    monkeypatch.setattr(demo, "timed_probe", lambda params: demo.Probe(10, 1.0, 0.5, 0.1))
    # said before the weights load: an installed wheel would fetch VGG16's 528 MB first
    monkeypatch.setattr("nst_core.vgg.extractor_for", lambda params: pytest.fail("weights loaded first"))
    assert main(["demo", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("nst: error:")]
    assert len(errors) == 1 and "no sample images in" in errors[0] and "Traceback" not in err, err
