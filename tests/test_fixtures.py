"""Checkpoints written by an earlier version of the code (tests/fixtures, made 2026-12-07 on the CPU) still resume and
evaluate: the checkpoint format is a promise to every run folder on a user's disk.

    ema-mid-epoch/  --model wideresnet --depth 10 --widen-factor 1 --batch-size 16 --epochs 3 --ema 0.9 --seed 0,
                    interrupted at epoch 2, step 2 of 4 (last.pt), best.pt from epoch 1
    finished/       the same model without --ema, --epochs 2, finished (last.pt and best.pt)

Both trained on conftest's write_cifar100 data (64 training and 32 test images, seed 0), as `cifar_dir` makes it.
"""
import re
import shutil
from pathlib import Path

from checkpoint_file import load_checkpoint

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def copied(name, tmp_path):
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def test_a_mid_epoch_checkpoint_with_a_weight_average_resumes_to_the_end_of_its_run(cifar_dir, tmp_path, train_main,
                                                                                   capsys):
    folder = copied("ema-mid-epoch", tmp_path)
    before = load_checkpoint(folder / "last.pt")
    assert train_main(["--resume", str(folder), "--data-dir", str(cifar_dir), "--no-download"]) == 0
    out = capsys.readouterr().out
    assert f"resumed from {folder / 'last.pt'} at epoch 2, step 2" in out
    after = load_checkpoint(folder / "last.pt")
    assert (after["epoch"], after["step"], after["run_id"]) == (3, 0, before["run_id"])
    assert after["history"][0] == before["history"][0] and [row["epoch"] for row in after["history"]] == [1, 2, 3]
    assert after["ema"].keys() == before["ema"].keys() and after["args"]["ema"] == 0.9
    assert (folder / "metrics.csv").is_file() and (folder / "config.json").is_file()


def test_a_finished_checkpoint_evaluates_to_the_accuracy_it_recorded(cifar_dir, tmp_path, train_main, capsys):
    folder = copied("finished", tmp_path)
    recorded = load_checkpoint(folder / "best.pt")["history"][-1]["test_top1"]
    assert train_main(["--evaluate", str(folder), "--data-dir", str(cifar_dir), "--no-download"]) == 0
    top1 = float(re.search(r"top-1 ([\d.]+)%", capsys.readouterr().out).group(1))
    assert top1 == round(100 * recorded, 2)


def test_a_resume_of_a_finished_run_says_it_is_finished_and_how_to_train_longer(cifar_dir, tmp_path, train_main,
                                                                                capsys):
    folder = copied("finished", tmp_path)
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    assert train_main(["--resume", str(folder), "--data-dir", str(cifar_dir), "--no-download"]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines()[0] == (f"{folder / 'last.pt'} has finished its 2 epochs: nothing to train. To "
                                            f"train it longer, give a larger --epochs (the schedule is stretched to "
                                            f"it), for example:")
    longer = captured.err.splitlines()[1].split()
    assert longer[:4] == ["python", "train.py", "--resume", str(folder / "last.pt")]
    assert longer[-2:] == ["--epochs", "4"]
    assert "resumed" not in captured.out and "damaged" not in captured.err
    assert {name: (folder / name).read_bytes() for name in before} == before  # the checkpoints, as they were
    assert train_main(["--resume", str(folder), "--data-dir", str(cifar_dir), "--no-download", "--epochs", "3"]) == 0
    assert load_checkpoint(folder / "last.pt")["epoch"] == 3
