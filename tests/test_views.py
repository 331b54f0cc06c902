"""What users look at besides the plots: progress lines in logs, MLflow's experiment kind, run
inputs and tags, and DVC's headline metrics (the end-to-end view is in tests/test_pipeline.py)."""
import pytest

from stages.lib import dvc_views, prepared, tracking
from stages.lib.progress import Progress
from tests.conftest import save_data, synthetic_images


def test_progress_off_a_terminal_logs_one_line_per_bar(capsys):
    progress = Progress("ssl n10_s0 epoch 2/5", 1000, "img", initial=200)
    for done in (400, 600, 1000):
        progress.update(done, loss=1.23456)
    Progress("decode", 10, "img", quiet=True).update(10)  # another rank's: silent
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("ssl n10_s0 epoch 2/5: loss 1.235, 1,000 img in 0:00 (")
    assert lines[0].endswith(" img/s)")


def test_progress_resumed_at_its_total_logs_no_rate(capsys):
    """A resume on an epoch's last step counts no images here: no "0 img/s" in its line."""
    Progress("ssl n10_s0 epoch 2/5", 1000, "img", initial=1000).update(1000, loss=1.23456)
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["ssl n10_s0 epoch 2/5: loss 1.235, 1,000 img in 0:00"], lines


def test_experiment_is_tagged_as_model_training_even_when_made_before(isolated_mlflow):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{isolated_mlflow}")
    client.create_experiment("old", artifact_location=(isolated_mlflow.parent / "artifacts").as_uri())
    for name in ("old", "new"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("MLFLOW_EXPERIMENT_NAME", name)
            tracking.connect()
        tags = client.get_experiment_by_name(name).tags
        assert tags["mlflow.experimentKind"] == "custom_model_development"


def test_the_data_set_is_the_runs_input(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("DVC_STAGE", raising=False)
    data = save_data(tmp_path / "data", synthetic_images(2), synthetic_images(1), source="copies/cifar10.tar.gz")
    facts = prepared.read_facts(data)
    digest = facts.content_sha256
    whole, part = tracking.dataset(facts, "training"), tracking.dataset(facts, "training", subset=("n10", "f00d"))
    assert whole == {"name": "cifar10", "source": str(tmp_path / "copies/cifar10.tar.gz"), "digest": digest[:8],
                     "context": "training"}
    assert part["name"] == "cifar10-n10" and len(part["digest"]) == 8 and part["digest"] != whole["digest"]
    url = "https://example.org/cifar-100-python.tar.gz"
    save_data(tmp_path / "x", synthetic_images(2), synthetic_images(1), source="cifar100", url=url)
    official = tracking.dataset(prepared.read_facts(tmp_path / "x"), "evaluation")
    assert (official["name"], official["source"]) == ("cifar100", url)
    with tracking.stage_run("finetune@ssl", {"seed": 0}, run_name="ssl-n10_s0", data=part) as run:
        run_id = run.run_id
    from mlflow.tracking import MlflowClient

    logged = MlflowClient().get_run(run_id)
    assert "dvc.pipeline_run" not in logged.data.tags  # not run by DVC: no pipeline run to group by
    (given,) = logged.inputs.dataset_inputs
    assert (given.dataset.name, given.dataset.digest) == ("cifar10-n10", part["digest"])
    assert part["source"] in given.dataset.source
    assert [(t.key, t.value) for t in given.tags] == [("mlflow.data.context", "training")]


def test_headline_numbers_stay_finite_and_few():
    summary = {mode: {"n10": {"fraction": 0.1, "accuracy": acc, "f1": acc - 0.01}}
               for mode, acc in (("ssl", 0.62), ("baseline", 0.35))}
    comparison = {"n10": {"fraction": 0.1, "difference": 0.27, "ci_low": 0.25, "ci_high": 0.29, "p_primary_holm": 0.0,
                          "seeds": 1},
                  "label_efficiency": {"note": "text is not a metric"}, "note": "nor this"}
    cells = [{"seconds": 10.0}, {"seconds": 2.5}]
    files = dvc_views.headline(summary, comparison, cells, {"knn_accuracy": 0.5, "seconds": 30.0, "device": "cpu"})
    assert list(files["n10.json"]["accuracy"]) == ["baseline", "ssl"]  # reading order
    assert files["n10.json"]["gain"] == {"accuracy": 0.27, "ci_lower": 0.25, "ci_upper": 0.29, "log10_p": -300.0}
    assert files["study.json"] == {"knn_accuracy": 0.5, "seconds": 42.5}
