"""Every stage's command line: exit code (2 bad input, 1 other), the culprit on the last stderr line,
no traceback unless asked for, no output left; and SIGINT/SIGTERM/kill -9 during training resume to
exactly the weights of an uninterrupted run."""
import json
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from stages import init_weights
from stages.lib import study
from tests.conftest import (
    REPO, finetune_argv, make_archive, png_bytes, pretrain_argv, run_module, synthetic_images, write_params, write_tree,
)
from tests.faults import (
    TINY, assert_failed, edited_params, last_line, leftovers, mkdir, renamer, setter,
)


# ---------------------------------------------------------------------------------------------
# 5/6. Every stage's command line: exit code, last line, no traceback, no output left


def bad_image_archive(base):
    write_tree(base / "tree", n_train=2, n_test=1)
    (base / "tree/cifar10/test/dog/0005.png").write_bytes(png_bytes(synthetic_images(1)[0][0])[:150])
    return make_archive(base / "tree", base / "bad.tar.gz")


def data_args(root, case, edit=lambda raw: None, **params_edits):
    path = edited_params(mkdir(root / case) / "params.yaml", edit, **params_edits)
    return ["--params", path, "--out", root / case / "out", "--download-dir", root / case / "download"]


def pretrain_args(root, case, **params_edits):
    path = write_params(mkdir(root / case) / "params.yaml", **{**TINY, **params_edits})
    out = root / case
    return pretrain_argv(path, root / "data", root / "splits/val.npy", out, out / "checkpoint.pt",
                         outs=("ssl.pt", "linear.pt"))


def finetune_args(root, case, init, mode="ssl", **params_edits):
    out = mkdir(root / case)
    params = write_params(out / "params.yaml", **{**TINY, **params_edits}) if params_edits else root / "params.yaml"
    return finetune_argv(params, mode, init, root / "data", root / "splits", out)


def evaluate_args(root, case, plots_dir_is_a_file=False, **params_edits):
    from tests.test_evaluate import fabricate_cell, fabricate_data, stage_args

    base = mkdir(root / case)
    for mode in ("baseline", "ssl"):
        fabricate_cell(base, mode, 1.0, 0, 0.6, epochs=3)
    fabricate_data(base, "synthetic")
    write_params(base / "params.yaml", **{**TINY, **params_edits})
    if plots_dir_is_a_file:
        (base / "plots").write_text("not a folder")
    return stage_args(base)


# (id, module, args(project root, case name), exit code, culprits on the last line, outputs
# (in the case's folder) that must not exist)
CLI_CASES = [
    ("data-typo-top-level", "stages.data", lambda r, c: data_args(r, c, renamer("fraction", "fractions")),
     2, ["params.yaml", "fractions: unknown key", "did you mean fraction?"], ["out"]),
    ("data-bad-image-in-test", "stages.data",
     lambda r, c: data_args(r, c, **{"data.source": str(bad_image_archive(r / c))}),
     2, ["cifar10/test/dog/0005.png in ", "bad.tar.gz", "not a readable image"], ["out"]),
    ("split-fraction-zero", "stages.split",
     lambda r, c: ["--params", write_params(mkdir(r / c) / "params.yaml", **{**TINY, "fraction": [0.5, 0]}),
                   "--data", r / "data", "--out", r / c / "out"],
     2, ["fraction = [0.5, 0]", "(0, 1]"], ["out"]),
    ("split-missing-data", "stages.split",
     lambda r, c: ["--params", r / "params.yaml", "--data", r / "nodata", "--out", r / c / "out"],
     2, ["nodata/meta.json", "not found", "rerun: dvc repro -f data"], ["out"]),
    ("init-unknown-arch", "stages.init_weights",
     lambda r, c: ["--params", write_params(mkdir(r / c) / "params.yaml", **{**TINY, "model.arch": "resnet50"}),
                   "--data", r / "data", "--out", r / c / "baseline.pt"],
     2, ["model.arch = 'resnet50'", "resnet18, resnet34"], ["baseline.pt"]),
    ("pretrain-batch-above-data", "stages.pretrain", lambda r, c: pretrain_args(r, c, **{"pretrain.batch_size": 1000}),
     2, ["pretrain.batch_size = 1000", "160 training images"], ["ssl.pt", "pretrain.json", "checkpoint.pt"]),
    ("pretrain-nan-loss", "stages.pretrain",
     lambda r, c: pretrain_args(r, c, **{"pretrain.lr": 1e30, "pretrain.warmup_epochs": 0}),
     1, ["loss is", "at epoch 1, step", "lower learning rate"],
     ["ssl.pt", "linear.pt", "pretrain.json", "pretrain.csv"]),
    ("finetune-ssl-without-weights", "stages.finetune", lambda r, c: finetune_args(r, c, r / "init/none.pt"),
     2, ["init/none.pt", "not found"], ["out", "curves"]),
    ("finetune-ssl-other-width", "stages.finetune", lambda r, c: finetune_args(r, c, r / "init/wide.pt"),
     2, ["init/wide.pt", "width 8", "width 4"], ["out", "curves"]),
    ("finetune-ssl-random-weights", "stages.finetune", lambda r, c: finetune_args(r, c, r / "init/baseline.pt"),
     2, ["init/baseline.pt", "random weights", "mode ssl needs self-supervised"], ["out", "curves"]),
    ("finetune-head-epochs-cover-all", "stages.finetune",
     lambda r, c: finetune_args(r, c, r / "init/ssl.pt", **{"finetune.head_epochs": 2, "finetune.max_epochs": 2}),
     2, ["finetune.head_epochs = 2", "below finetune.max_epochs = 2"], ["out", "curves"]),
    ("evaluate-confidence", "stages.evaluate", lambda r, c: evaluate_args(r, c, **{"evaluate.confidence": 1.5}),
     2, ["evaluate.confidence = 1.5", "(0, 1)"], ["metrics/summary.json"]),
    ("evaluate-fails-after-writing", "stages.evaluate", lambda r, c: evaluate_args(r, c, plots_dir_is_a_file=True),
     1, ["evaluate-fails-after-writing/plots"], ["metrics/summary.json", "metrics/comparison.json",
                                                 "metrics/per_class.json", "metrics/report.md"]),
]


@pytest.mark.parametrize("case, module, make_args, code, culprits, outputs", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_stage_fails_with_one_clear_line(project, stage_env, case, module, make_args, code, culprits, outputs):
    result = run_module(module, *make_args(project, case), env=stage_env)
    assert_failed(result, code, culprits, [project / case / o for o in outputs], root=project / case)


@pytest.mark.parametrize("how", ["--debug", "SSL_DEBUG=1"])
def test_debug_shows_the_traceback(tmp_path, stage_env, how):
    path = edited_params(tmp_path / "params.yaml", setter("fraction", 0))
    env = {**stage_env, "SSL_DEBUG": "1"} if how == "SSL_DEBUG=1" else stage_env
    args = ["--params", path, "--data", tmp_path / "data", "--out", tmp_path / "splits"]
    result = run_module("stages.split", *args, *(["--debug"] if how == "--debug" else []), env=env)
    assert result.returncode == 2 and "Traceback" in result.stderr
    assert last_line(result.stderr).startswith("error: ") and "fraction = 0" in last_line(result.stderr)


def test_unknown_mode_is_a_usage_error(project, stage_env):
    result = run_module("stages.finetune", *finetune_args(project, "usage", project / "init/ssl.pt", mode="simclr"),
                        env=stage_env)
    assert result.returncode == 2 and "invalid choice: 'simclr'" in last_line(result.stderr)
    assert "Traceback" not in result.stderr


def test_usage_names_the_module_to_run(capsys):
    """Stage init's module is stages.init_weights: its usage line names that, run with -m or imported."""
    result = run_module("stages.init_weights", "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m stages.init_weights ")
    with pytest.raises(SystemExit) as exit_info:
        init_weights.main(["--help"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("usage: python -m stages.init_weights ")


# ---------------------------------------------------------------------------------------------
# 5. Interruptions: SIGINT / SIGTERM save a checkpoint; kill -9 loses at most a few epochs;
#    the resumed run ends with exactly the weights of an uninterrupted one


class Running:
    """A stage run in the background whose stderr lines are collected as they come."""

    def __init__(self, module, args, env):
        self.proc = subprocess.Popen([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern, timeout=120):
        """Wait for a stderr line matching the regular expression `pattern`."""
        deadline, marker = time.monotonic() + timeout, re.compile(pattern)
        while not any(marker.search(line) for line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                self.reader.join(5)
                raise AssertionError(f"{pattern!r} never came:\n" + "\n".join(self.lines))
            time.sleep(0.01)

    def finish(self, timeout=120):
        self.proc.wait(timeout)
        self.reader.join(10)
        return self.proc.returncode, "\n".join(self.lines)


def epoch_done(label, epoch):
    """A log line that ends the epoch: 'pretrain epoch 1: loss ...' or a full progress bar."""
    return rf"^{label} epoch {epoch}(/\d+)?(: loss| \[#{{20}}\])"


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module", autouse=True)
def references(project, stage_env):
    """The uninterrupted runs that resumed ones must match. They take a while, so they start in
    the background with the module, and only the tests that compare with them wait for them."""
    runs = {"pretrain": Running("stages.pretrain", pretrain_args(project, "reference"), stage_env),
            "finetune": Running("stages.finetune", finetune_args(project, "ft-reference", project / "init/ssl.pt"),
                                stage_env)}
    yield runs
    for run in runs.values():
        if run.proc.poll() is None:
            run.proc.kill()
        run.finish()


def finished(references, name):
    code, stderr = references[name].finish(timeout=300)
    assert code == 0, stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_interrupted_pretraining_resumes_to_the_same_weights(project, stage_env, references, sig):
    case = f"pretrain-{sig.name}"
    args, out = pretrain_args(project, case), project / case
    running = Running("stages.pretrain", args, stage_env)
    # kill -9 gives no chance to save: wait for a periodic checkpoint (every epoch here).
    running.wait_for(epoch_done("pretrain", 2 if sig == signal.SIGKILL else 1))
    running.proc.send_signal(sig)
    code, stderr = running.finish()
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:
        assert code == 1 and "Traceback" not in stderr, stderr
        line = last_line(stderr)
        assert f"stopped by {sig.name}" in line and f"checkpoint saved to {out / 'checkpoint.pt'}" in line, line
    assert (out / "checkpoint.pt").exists()
    assert not (out / "ssl.pt").exists() and not (out / "pretrain.json").exists()

    resumed = run_module("stages.pretrain", *args, env=stage_env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {out / 'checkpoint.pt'}" in resumed.stderr
    finished(references, "pretrain")
    assert_same_weights(weights(out / "ssl.pt"), weights(project / "reference/ssl.pt"))
    assert not (out / "checkpoint.pt").exists() and leftovers(out) == []


def test_interrupted_finetuning_resumes_to_the_same_result(project, stage_env, references):
    args, out = finetune_args(project, "ft-sigint", project / "init/ssl.pt"), project / "ft-sigint"
    running = Running("stages.finetune", args, stage_env)
    running.wait_for(epoch_done("ssl n100_s0", 1))
    running.proc.send_signal(signal.SIGINT)
    code, stderr = running.finish()
    assert code == 1 and "Traceback" not in stderr, stderr
    assert "stopped by SIGINT" in last_line(stderr) and "checkpoint saved to" in last_line(stderr)
    assert (out / "work/n100_s0/checkpoint.pt").exists() and not (out / "out").exists()

    resumed = run_module("stages.finetune", *args, env=stage_env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    finished(references, "finetune")
    with np.load(out / "out/n100_s0.npz") as got, np.load(project / "ft-reference/out/n100_s0.npz") as want:
        np.testing.assert_array_equal(got["y_pred"], want["y_pred"])
    got, want = (json.loads((d / "out/n100_s0.json").read_text()) for d in (out, project / "ft-reference"))
    assert {k: v for k, v in got.items() if k != "seconds"} == {k: v for k, v in want.items() if k != "seconds"}
    curves = [study.read_curve(d / "curves/n100_s0.csv") for d in (out, project / "ft-reference")]
    for column in ("epoch", "val_loss", "val_accuracy", "lr"):
        np.testing.assert_array_equal(curves[0][column], curves[1][column])
    np.testing.assert_allclose(curves[0]["train_loss"], curves[1]["train_loss"], rtol=1e-6)
    assert not (out / "work").exists() and leftovers(out) == []
