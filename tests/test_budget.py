"""The time budget's arithmetic on figures whose answer is worked by hand."""
import pytest

from stages.lib import budget

RATES = budget.Rates(train_views_per_s=1000, augment_views_per_s=4000, infer_images_per_s=2000,
                     decode_images_per_s=100, stage_start_s=5, compile_s=30, checkpoint_s=1, evaluate_s=7)
PRETRAIN = {"epochs": 4, "batch_size": 100, "knn_every": 2, "checkpoint_seconds": 2.0, "compile": False}
FINETUNE = {"max_epochs": 3, "batch_size": 100, "equal_steps": True, "compile": True}


def test_budget_rows_are_worked_by_hand():
    study = budget.Study(train_images=1000, test_images=200, val_images=200, fractions=(1.0, 0.1), seeds=2,
                         modes=2, pretrain=PRETRAIN, finetune=FINETUNE)
    rows, total = budget.study_budget(RATES, study)
    by_stage = {row["stage"]: row for row in rows}
    # data: 1,200 images at 100/s + start-up.
    assert by_stage["data"]["seconds"] == pytest.approx(5 + 12)
    # pretrain: 10 steps x 200 views an epoch at 1/1000 + 1/4000 s a view = 2.5 s; 4 epochs = 10 s;
    # kNN twice over 1,000 images at 2,000/s = 1 s; epochs outlast checkpoint_seconds: a checkpoint each, 4.
    assert by_stage["pretrain"]["seconds"] == pytest.approx(5 + 10 + 1 + 4)
    assert by_stage["pretrain"]["images"] == 4 * 10 * 100 * 2
    # finetune, one mode: equal steps (800 // 100 = 8 a epoch) x 3 epochs x 100 images x 2 fractions x 2 seeds
    # = 9,600 images at 1,000/s; validation 3 x 200 + test 200 = 800 per cell x 4 cells at 2,000/s = 1.6 s.
    finetune = by_stage["finetune x 2 modes"]
    assert finetune["images"] == 2 * 9600
    assert finetune["seconds"] == pytest.approx(2 * (5 + 30 + 9.6 + 1.6))
    assert by_stage["evaluate"]["seconds"] == pytest.approx(12)
    assert total == pytest.approx(17 + 5 + 20 + 5 + 2 * 46.2 + 12)
    assert "**whole study**" in budget.format_budget(rows, total)


def test_fewer_labels_train_fewer_steps_without_equal_steps():
    study = budget.Study(1000, 200, 200, (1.0, 0.1), 1, 1, PRETRAIN, {**FINETUNE, "equal_steps": False})
    rows, _ = budget.study_budget(RATES, study)
    # 800 and 80 labeled images: 8 steps and max(1, 0) = 1 step of 100 per epoch, 3 epochs.
    assert next(r for r in rows if r["stage"].startswith("finetune"))["images"] == (8 + 1) * 3 * 100
