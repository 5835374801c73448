"""train.py as users run it: flags, outputs, resume, evaluation and the errors they can cause."""
import json
import os
import re
import resource
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import REPO, assert_same_weights, load_weights, run_train, tiny_run_args
from checkpoint_file import load_checkpoint
from run_dir import read_metrics


@pytest.mark.parametrize("flags", [
    ["--batch-size", "-1"], ["--batch-size", "0"], ["--lr", "0"], ["--lr", "-0.1"], ["--base-lr", "nan"],
    ["--epochs", "0"], ["--target-accuracy", "1.5"], ["--target-accuracy", "0"], ["--model", "vgg16"],
    ["--momentum", "1"], ["--weight-decay", "-1"], ["--label-smoothing", "1"], ["--patience", "0"],
    ["--depth", "4"], ["--dropout", "inf"], ["--workers", "0"], ["--precision", "fp8"], ["--seed", "x"],
    ["--resume", "--evaluate"], ["--nesterov", "--momentum", "0"], ["--cutout", "33"], ["--val-size", "-5"],
    ["--seed", "4294967296"], ["--depth", "12"], ["--widen-factor", "10000"], ["--ema", "1"],
    ["--mixup", "-1"], ["--cutmix", "nan"], ["--min-momentum", "0.95"], ["--cutmix-prob", "0.5"],
    ["--cutmix", "1", "--cutmix-prob", "0"], ["--asam"], ["--sam", "0"], ["--auto-augment", "autoaugment"],
    ["--ra-num-ops", "3"], ["--auto-augment", "ta_wide", "--ra-magnitude", "5"], ["--auto-augment", "ra",
                                                                                  "--ra-magnitude", "31"],
    ["--device", "gpu"], ["--device", "CPU"], ["--device", "cuda:x"], ["--checkpoint-dir", ""], ["--data-dir", " "],
    ["--workers", "100000"], ["--sync-bn"], ["--device", "tpu"], ["--lr", "1e39"], ["--wd", "1e300"],
    ["--bn-bias-lr-scale", "0"], ["--flip", "never"], ["--lr", "1e30", "--bn-bias-lr-scale", "1e30"],
    ["--depth", "6000000000000000000004"],
])
def test_bad_flags_exit_2_with_a_message(train_main, capsys, flags):
    with pytest.raises(SystemExit) as exited:
        train_main(flags)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert ": error: " in err and err.count("\n") == 1  # one line, no usage block


@pytest.mark.parametrize("flags, message", [
    (["--lr", "0"], "argument --lr/--base-lr: 0 must be above 0"),
    (["--epochs", "0"], "argument --epochs: 0 must be at least 1"),
    (["--dropout", "1"], "argument --dropout: 1 must be in [0, 1)"),
    (["--target-accuracy", "0"], "argument --target-accuracy: 0 must be in (0, 1]"),
    (["--lr", "nan"], "argument --lr/--base-lr: nan is not a number"),
    (["--wd", "1e39"], "argument --wd/--weight-decay: 1e39 is beyond float32's largest number, 3.40282e+38"),
    (["--seed", "4294967296"], "argument --seed: 4294967296 must be in [0, 4294967295]"),
])
def test_a_number_out_of_range_is_told_its_range_in_words(train_main, capsys, flags, message):
    with pytest.raises(SystemExit):
        train_main(flags)
    assert capsys.readouterr().err.endswith(f": error: {message} (see python {Path(sys.argv[0]).name} --help)\n")


PROBE_TORCH = ("import runpy, sys; sys.argv = [sys.argv[1]] + sys.argv[2:]\n"
               "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
               "except SystemExit as exit:\n    print('torch loaded' if 'torch' in sys.modules else 'no torch', exit.code)")


def answer_without_torch(script, *flags, cwd=REPO):
    """What `python SCRIPT FLAGS` exits with, and whether it had loaded torch by then."""
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-c", PROBE_TORCH, str(REPO / script), *map(str, flags)], cwd=cwd,
                            capture_output=True, text=True)
    return result.stdout.strip().splitlines()[-1], result.stderr


def test_help_flag_errors_and_run_folder_and_data_folder_problems_answer_without_loading_torch(trained_folder,
                                                                                                cifar_dir, tmp_path):
    inner = cifar_dir / "cifar-100-python"
    assert answer_without_torch("train.py", "--help")[0] == "no torch 0"
    for flags in (["--lr", "0"], ["--device", "gpu"], ["--device", "CPU"], ["--sync-bn"]):
        assert answer_without_torch("train.py", *flags)[0] == "no torch 2", flags
    for flags, message in ((["--checkpoint-dir", trained_folder], "holds a run (last.pt, best.pt, metrics.csv, config.json)"),
                           (["--resume", tmp_path / "nothing"], "no checkpoint at"),
                           (["--evaluate", tmp_path / "nothing.pt"], "no checkpoint at"),
                           (["--data-dir", tmp_path / "no-data", "--no-download"], "CIFAR-100 not found: put"),
                           (["--data-dir", inner, "--no-download"], "is the cifar-100-python folder itself"),
                           (["--data-dir", inner / "train"], "is a file, not a folder"),
                           (["--evaluate", trained_folder, "--data-dir", tmp_path / "no-data", "--no-download"],
                            "CIFAR-100 not found: put")):
        answer, err = answer_without_torch("train.py", *flags)
        assert answer == "no torch 1" and message in err, (flags, err)
    assert answer_without_torch("plot.py", "--help")[0] == "no torch 0"
    assert answer_without_torch("bench.py", "--steps", "0")[0] == "no torch 2"


@pytest.fixture
def trained_folder(train_main, cifar_dir, tmp_path):
    folder = tmp_path / "trained"
    assert train_main(tiny_run_args(cifar_dir, folder, "--epochs", "1")) == 0
    return folder


def test_help_shows_each_default_once_and_never_splits_a_flag():
    import subprocess
    import sys
    text = subprocess.run([sys.executable, str(REPO / "train.py"), "--help"], capture_output=True, text=True).stdout
    assert "(default: None)" not in text and "(default: False)" not in text
    assert not any(line.count("default") > 1 for line in text.splitlines())
    assert not re.search(r"--[a-z]+-\n", text)  # "--batch-" at a line's end, "size" on the next
    assert "--batch-size 512 --lr 0.4" in " ".join(text.split())


def test_end_to_end_run_writes_checkpoints_and_metrics(cifar_dir, tmp_path):
    result = run_train("--epochs", "1", "--batch-size", "16", "--data-dir", cifar_dir, "--no-download",
                       "--checkpoint-dir", tmp_path / "ckpt")
    assert result.returncode == 0, result.stderr
    assert "resnet18 (100 classes): 11.2M parameters" in result.stdout
    epoch_line = next(line for line in result.stdout.splitlines() if line.startswith("epoch"))
    for part in ("1/1", "train loss", "test loss", "top-1", "top-5", "lr", "img/s", "new best"):
        assert part in epoch_line
    train_top1 = float(re.search(r"train loss \d+\.\d{4} \| train top-1 +(\d+\.\d\d)%", epoch_line).group(1))
    assert "best test top-1" in result.stdout and "img/s overall" in result.stdout
    checkpoint = load_checkpoint(tmp_path / "ckpt" / "last.pt")
    assert checkpoint["epoch"] == 1 and checkpoint["model_config"]["name"] == "resnet18"
    assert (tmp_path / "ckpt" / "best.pt").is_file()
    rows = read_metrics(tmp_path / "ckpt" / "metrics.csv")
    assert len(rows) == 1 and float(rows[0]["images_per_sec"]) > 0 and rows[0]["images"] == "64"
    assert float(rows[0]["lr"]) < 1e-5  # the lr the last step used: OneCycle ends near 0, not one step past it
    assert rows[0]["lr"] == f"{float(rows[0]['lr']):.6g}"  # to 6 significant digits, as the other columns are rounded
    assert train_top1 == round(100 * float(rows[0]["train_top1"]), 2)
    assert "done after 1 epoch," in result.stdout
    assert "start-up work in epoch 1 (the first step) not counted" in result.stdout  # no cudnn, no graph on a CPU
    assert re.search(r"; first step done at Unix time \d+\.\d{3}; training step: eager$", result.stdout, re.M)
    assert "recipe: --batch-size 16 --epochs 1 (given)\n" in result.stdout
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["batch_size"] == 16 and config["model"] == "resnet18"
    assert config.pop("world_size") == 1  # the processes that trained it
    assert {**config, "depth": 28, "widen_factor": 10, "dropout": 0.0} == checkpoint["args"]  # no WRN settings


def test_a_validation_split_picks_the_best_epoch_and_the_test_set_is_used_once_at_the_end(cifar_dir, tmp_path):
    result = run_train(*tiny_run_args(cifar_dir, tmp_path / "ckpt", "--epochs", "2", "--val-size", "20"))
    assert result.returncode == 0, result.stderr
    assert "training on 44 images; best.pt and early stopping judged on the val set" in result.stdout
    epoch_lines = [line for line in result.stdout.splitlines() if line.startswith("epoch")]
    assert len(epoch_lines) == 2 and all("val loss" in line and "test" not in line for line in epoch_lines)
    assert "for the final model" in result.stdout.splitlines()[-1] and "for best.pt" in result.stdout
    rows = read_metrics(tmp_path / "ckpt" / "metrics.csv")
    assert all(row["val_top1"] and not row["test_top1"] for row in rows)



def test_a_resumed_run_with_a_validation_split_still_tests_best_pt_at_the_end(train_main, cifar_dir, tmp_path,
                                                                              capsys):
    common = tiny_run_args(cifar_dir, tmp_path / "ckpt", "--epochs", "3", "--val-size", "20")
    assert train_main([*common, "--target-accuracy", "0.01", "--patience", "1"]) == 0
    capsys.readouterr()
    assert train_main([*common[:-2], "--resume", "--target-accuracy", "1.0"]) == 0
    assert "for best.pt" in capsys.readouterr().out


def straight_and_resumed(train_main, cifar_dir, tmp_path, *flags):
    """The checkpoints of a 2-epoch run and of the same run stopped after epoch 1 and resumed."""
    assert train_main(tiny_run_args(cifar_dir, tmp_path / "straight", "--epochs", "2", *flags)) == 0
    # Early stopping at a target any epoch reaches ends the first run after one epoch of the 2-epoch schedule.
    split = tmp_path / "split"
    assert train_main(tiny_run_args(cifar_dir, split, "--epochs", "2", *flags, "--target-accuracy", "0.01",
                                    "--patience", "1")) == 0
    assert load_checkpoint(split / "last.pt")["epoch"] == 1
    assert train_main(tiny_run_args(cifar_dir, split, "--resume", "--target-accuracy", "1.0")) == 0
    return load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(split / "last.pt")


def test_two_epochs_equal_one_epoch_plus_resume(train_main, cifar_dir, tmp_path):
    straight, resumed = straight_and_resumed(train_main, cifar_dir, tmp_path)
    assert resumed["epoch"] == 2
    assert_same_weights(straight["model"], resumed["model"])
    assert straight["optimizer"]["param_groups"][0]["lr"] == resumed["optimizer"]["param_groups"][0]["lr"]
    assert [row["test_top1"] for row in straight["history"]] == [row["test_top1"] for row in resumed["history"]]


STRONGEST_RECIPE = ("--auto-augment", "ta_wide", "--sam", "0.05", "--ema", "0.999", "--cutmix", "1.0",
                    "--cutmix-prob", "0.5")


def test_policy_sam_ema_and_cutmix_together_resume_exactly(train_main, cifar_dir, tmp_path):
    straight, resumed = straight_and_resumed(train_main, cifar_dir, tmp_path, *STRONGEST_RECIPE)
    assert_same_weights(straight["model"], resumed["model"])
    assert_same_weights(straight["ema"], resumed["ema"])
    assert [row["raw_top1"] for row in straight["history"]] == [row["raw_top1"] for row in resumed["history"]]


def test_the_airbench_tricks_together_resume_exactly(train_main, cifar_dir, tmp_path):
    straight, resumed = straight_and_resumed(train_main, cifar_dir, tmp_path, "--bn-bias-lr-scale", "16", "--flip",
                                             "alternate", "--tta-crops")
    assert_same_weights(straight["model"], resumed["model"])
    assert [group["lr"] for group in straight["optimizer"]["param_groups"]] == \
        [group["lr"] for group in resumed["optimizer"]["param_groups"]]
    assert [row["test_loss"] for row in straight["history"]] == [row["test_loss"] for row in resumed["history"]]
    assert resumed["args"]["flip"] == "alternate" and resumed["args"]["tta_crops"] is True


def test_an_ema_run_resumes_exactly_and_load_model_returns_the_average(train_main, cifar_dir, tmp_path):
    from train_utils import load_model
    straight, resumed = straight_and_resumed(train_main, cifar_dir, tmp_path, "--ema", "0.8")
    assert_same_weights(straight["ema"], resumed["ema"])
    assert_same_weights(straight["model"], resumed["model"])
    assert not torch.equal(straight["ema"]["fc.weight"], straight["model"]["fc.weight"])
    loaded = load_model(tmp_path / "straight" / "last.pt")
    assert torch.equal(loaded.state_dict()["fc.weight"], straight["ema"]["fc.weight"])


def test_seeded_cpu_runs_repeat_exactly(train_main, cifar_dir, tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert train_main(tiny_run_args(cifar_dir, tmp_path / name, "--epochs", "1", "--seed", seed)) == 0
    assert_same_weights(load_weights(tmp_path / "a" / "last.pt"), load_weights(tmp_path / "b" / "last.pt"))
    a, c = load_weights(tmp_path / "a" / "last.pt"), load_weights(tmp_path / "c" / "last.pt")
    assert not torch.equal(a["fc.weight"], c["fc.weight"])


def test_evaluate_reports_the_accuracy_stored_in_best_pt(train_main, cifar_dir, tmp_path, capsys):
    assert train_main(tiny_run_args(cifar_dir, tmp_path / "ckpt", "--epochs", "2")) == 0
    stored = load_checkpoint(tmp_path / "ckpt" / "best.pt")["best_top1"]
    capsys.readouterr()
    assert train_main(["--evaluate", "--checkpoint-dir", str(tmp_path / "ckpt"), "--data-dir", str(cifar_dir),
                       "--no-download"]) == 0
    out = capsys.readouterr().out
    assert f"top-1 {100 * stored:.2f}%" in out and f"stored best top-1 {100 * stored:.2f}%" in out
    assert "(--tta)" not in out
    evaluate = ["--evaluate", str(tmp_path / "ckpt"), "--data-dir", str(cifar_dir), "--no-download"]
    assert train_main([*evaluate, "--tta"]) == 0
    assert "% on each image and its mirror (--tta) (stored best" in capsys.readouterr().out
    assert train_main([*evaluate, "--model", "resnet18"]) == 1
    assert capsys.readouterr().err.endswith("was trained with --model wideresnet; refusing --model resnet18 (drop "
                                            "--model: --evaluate tests a model as it was trained)\n")


def test_a_compiled_run_trains_and_resumes_uncompiled(cifar_dir, tmp_path):
    compiled = run_train(*tiny_run_args(cifar_dir, tmp_path / "ckpt", "--epochs", 1, "--compile"), timeout=600)
    assert compiled.returncode == 0, compiled.stderr
    assert "compiled" in compiled.stdout and "epoch   1/1" in compiled.stdout
    assert not any(key.startswith("_orig_mod") for key in load_weights(tmp_path / "ckpt" / "last.pt"))
    resumed = run_train(*tiny_run_args(cifar_dir, tmp_path / "ckpt", "--resume", "--epochs", 2))
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(tmp_path / "ckpt" / "last.pt")["epoch"] == 2


def test_resume_with_no_checkpoint_is_an_error_not_a_fresh_start(train_main, cifar_dir, tmp_path, capsys):
    assert train_main(tiny_run_args(cifar_dir, tmp_path / "ckpt", "--resume")) == 1
    assert "error: no checkpoint at" in capsys.readouterr().err
    assert not (tmp_path / "ckpt" / "last.pt").exists()


@pytest.mark.parametrize("flags, message", [
    (["--model", "resnet18"], "trained with --model wideresnet; refusing --model resnet18"),
    (["--widen-factor", "2"], "refusing --widen-factor 2"),
    (["--batch-size", "32"], "refusing --batch-size 32"),
    (["--lr", "0.5"], "refusing --lr 0.5"),
    (["--sam", "0.1"], "was trained without --sam; refusing --sam 0.1"),  # not "with --sam None"
])
def test_resume_refuses_flags_that_contradict_the_checkpoint(train_main, cifar_dir, tmp_path, capsys, flags,
                                                             message):
    assert train_main(tiny_run_args(cifar_dir, tmp_path / "ckpt", "--epochs", "1")) == 0
    before = (tmp_path / "ckpt" / "last.pt").read_bytes()
    assert train_main(["--resume", "--checkpoint-dir", str(tmp_path / "ckpt"), "--data-dir", str(cifar_dir),
                       *flags]) == 1
    assert message in capsys.readouterr().err
    assert (tmp_path / "ckpt" / "last.pt").read_bytes() == before


def test_a_checkpoint_older_than_a_fixed_flag_resumes_as_that_flags_default(train_main, cifar_dir, tmp_path, capsys):
    path = tmp_path / "ckpt" / "last.pt"
    assert train_main(tiny_run_args(cifar_dir, tmp_path / "ckpt", "--epochs", "1")) == 0
    checkpoint = load_checkpoint(path)
    del checkpoint["args"]["bn_bias_lr_scale"]  # as written before the flag existed
    torch.save(checkpoint, path)
    before = path.read_bytes()
    capsys.readouterr()
    assert train_main(tiny_run_args(cifar_dir, tmp_path / "ckpt", "--resume", "--epochs", "2",
                                    "--bn-bias-lr-scale", "8")) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {path} was trained with --bn-bias-lr-scale 1.0; refusing --bn-bias-lr-scale 8.0 (drop "
        f"--bn-bias-lr-scale to go on as it was trained, or start a new run in another --checkpoint-dir)"]
    assert path.read_bytes() == before
    assert train_main(tiny_run_args(cifar_dir, tmp_path / "ckpt", "--resume", "--epochs", "2")) == 0
    assert load_checkpoint(path)["args"]["bn_bias_lr_scale"] == 1.0


def test_resume_may_extend_the_epochs(train_main, cifar_dir, tmp_path):
    assert train_main(tiny_run_args(cifar_dir, tmp_path / "ckpt", "--epochs", "1")) == 0
    assert train_main(["--resume", "--epochs", "3", "--checkpoint-dir", str(tmp_path / "ckpt"),
                       "--data-dir", str(cifar_dir)]) == 0
    checkpoint = load_checkpoint(tmp_path / "ckpt" / "last.pt")
    assert checkpoint["epoch"] == 3 and len(read_metrics(tmp_path / "ckpt" / "metrics.csv")) == 3


def test_a_new_run_will_not_overwrite_an_existing_one(train_main, cifar_dir, tmp_path, capsys):
    assert train_main(tiny_run_args(cifar_dir, tmp_path / "ckpt", "--epochs", "1")) == 0
    before = (tmp_path / "ckpt" / "last.pt").read_bytes()
    assert train_main(tiny_run_args(cifar_dir, tmp_path / "ckpt", "--epochs", "1")) == 1
    assert "ckpt holds a run (last.pt, best.pt, metrics.csv, config.json): continue it with --resume" in capsys.readouterr().err
    assert (tmp_path / "ckpt" / "last.pt").read_bytes() == before


def test_missing_data_without_network_is_one_clear_line(tmp_path):
    result = run_train("--data-dir", tmp_path / "nowhere", "--no-download", "--checkpoint-dir", tmp_path / "ckpt")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: CIFAR-100 not found: put cifar-100-python.tar.gz (https://www.cs.toronto.edu/~kriz/"
        f"cifar-100-python.tar.gz) or its extracted cifar-100-python/ folder in {tmp_path / 'nowhere'}, or drop "
        f"--no-download"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no empty data or checkpoint folder left behind


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "foreign"])
def test_resume_from_a_damaged_checkpoint_is_refused_and_it_is_kept(train_main, cifar_dir, tmp_path, capsys,
                                                                    damage):
    path = tmp_path / "ckpt" / "last.pt"
    assert train_main(tiny_run_args(cifar_dir, tmp_path / "ckpt", "--epochs", "1")) == 0
    if damage == "foreign":
        torch.save(load_weights(path), path)  # a bare state_dict, as other repos save
    else:
        data = path.read_bytes()
        path.write_bytes({"truncated": data[: len(data) // 3], "empty": b"", "garbage": os.urandom(5000)}[damage])
    damaged = path.read_bytes()
    capsys.readouterr()
    assert train_main(tiny_run_args(cifar_dir, tmp_path / "ckpt", "--resume")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and str(path) in err[0]
    assert path.read_bytes() == damaged


def unwritable_folder(tmp_path):
    """A folder this process cannot create files in; root ignores permission bits, but not sysfs."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return "/sys/kernel" if os.access(folder, os.W_OK) else folder


def test_an_unwritable_checkpoint_folder_is_reported_before_training(train_main, cifar_dir, tmp_path, capsys):
    folder = unwritable_folder(tmp_path)
    assert train_main(tiny_run_args(cifar_dir, folder, "--epochs", "1")) == 1
    captured = capsys.readouterr()
    assert f"error: checkpoint folder {folder} is not writable" in captured.err
    assert "epoch" not in captured.out


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(cifar_dir, tmp_path):
    assert run_train(*tiny_run_args(cifar_dir, tmp_path / "ckpt", "--epochs", "1")).returncode == 0
    size = (tmp_path / "ckpt" / "last.pt").stat().st_size

    def limit_file_size():  # the OS refuses writes past this size: the next checkpoint cannot be written
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    result = run_train(*tiny_run_args(cifar_dir, tmp_path / "ckpt", "--resume", "--epochs", "2"),
                       preexec_fn=limit_file_size)
    assert result.returncode == 1
    assert "error: could not write" in result.stderr and ", if any, is untouched" in result.stderr
    assert load_checkpoint(tmp_path / "ckpt" / "last.pt")["epoch"] == 1
    assert not [p for p in (tmp_path / "ckpt").iterdir() if ".tmp" in p.name]


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(train_main, cifar_dir, tmp_path, capsys,
                                                                     monkeypatch):
    import train_utils
    real_criterion, calls = train_utils.make_criterion(), []

    def poisoned(logits, labels):  # finite for epoch 1 (4 steps), NaN from epoch 2, step 2
        calls.append(1)
        loss = real_criterion(logits, labels)
        return loss * float("nan") if len(calls) >= 6 else loss

    monkeypatch.setattr(train_utils, "make_criterion", lambda label_smoothing: poisoned)
    assert train_main(tiny_run_args(cifar_dir, tmp_path / "ckpt", "--epochs", "3")) == 1
    err = capsys.readouterr().err
    assert "NaN or infinite at epoch 2, step 2" in err and "last good checkpoint" in err
    assert load_checkpoint(tmp_path / "ckpt" / "last.pt")["epoch"] == 1
    best = load_weights(tmp_path / "ckpt" / "best.pt")
    assert all(torch.isfinite(value).all() for value in best.values() if value.is_floating_point())
    assert len(read_metrics(tmp_path / "ckpt" / "metrics.csv")) == 1


def test_the_fast_preset_sets_its_recipe_and_flags_still_win():
    from config import parse_args
    args, explicit = parse_args(["--preset", "fast", "--epochs", "12"])
    assert (args.batch_size, args.lr, args.nesterov, args.label_smoothing, args.tta) == (512, 0.4, True, 0.1, True)
    assert args.epochs == 12 and explicit == {"preset": "fast", "epochs": 12}


def test_the_cpu_preset_trains_a_small_wideresnet_and_flags_still_win(train_main, cifar_dir, tmp_path, capsys):
    assert train_main(["--preset", "cpu", "--epochs", "1", "--batch-size", "16", "--data-dir", str(cifar_dir),
                       "--no-download", "--checkpoint-dir", str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    assert "wideresnet (100 classes, depth=10, dropout=0.0, widen_factor=1): 0.1M parameters" in out
    assert ("recipe: --model wideresnet --depth 10 --widen-factor 1 --lr 0.2 --nesterov --label-smoothing 0.1 --flip "
            "alternate (--preset cpu); --preset cpu --batch-size 16 --epochs 1 (given)") in out
    settings = load_checkpoint(tmp_path / "ckpt" / "last.pt")["args"]
    assert (settings["lr"], settings["nesterov"], settings["label_smoothing"], settings["flip"]) == (
        0.2, True, 0.1, "alternate")


def test_sync_bn_in_one_process_is_a_flag_error(train_main, cifar_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        train_main(tiny_run_args(cifar_dir, tmp_path / "ckpt", "--sync-bn"))
    assert exited.value.code == 2
    assert "--sync-bn needs several processes on CUDA GPUs (torchrun)" in capsys.readouterr().err


def test_asking_for_a_missing_device_is_a_clear_error(train_main, cifar_dir, tmp_path, capsys):
    assert train_main(tiny_run_args(cifar_dir, tmp_path / "ckpt", "--device", "cuda:99")) == 1
    assert "error: device 'cuda:99' was asked for, but" in capsys.readouterr().err


def test_a_diverged_run_stops_in_one_line_and_saves_nothing_non_finite(cifar_dir, tmp_path):
    result = run_train(*tiny_run_args(cifar_dir, tmp_path / "ckpt", "--epochs", "3", "--lr", "300"))
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "became NaN or infinite" in line and "no checkpoint written yet" in line
    for name in ("last.pt", "best.pt"):
        path = tmp_path / "ckpt" / name
        if path.exists():
            weights = load_weights(path)
            assert all(torch.isfinite(value).all() for value in weights.values() if value.is_floating_point())


def test_resume_from_another_folder_continues_in_the_checkpoints_folder(train_main, cifar_dir, tmp_path,
                                                                         monkeypatch):
    run_a, other = tmp_path / "a" / "checkpoint", tmp_path / "b"
    assert train_main(tiny_run_args(cifar_dir, run_a, "--epochs", "2", "--target-accuracy", "0.01",
                                    "--patience", "1")) == 0
    other.mkdir()
    monkeypatch.chdir(other)
    args = [arg for arg in tiny_run_args(cifar_dir, "unused", "--target-accuracy", "1.0")
            if arg not in ("--checkpoint-dir", "unused")]
    assert train_main([*args, "--resume", str(run_a / "last.pt")]) == 0
    assert load_checkpoint(run_a / "last.pt")["epoch"] == 2
    assert list(other.iterdir()) == []  # nothing written where the command was typed


def test_a_second_run_on_the_same_folder_is_refused_while_the_first_trains(cifar_dir, tmp_path):
    import subprocess
    import sys
    import time

    from conftest import REPO
    checkpoint_dir = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, str(REPO / "train.py"),
                              *map(str, tiny_run_args(cifar_dir, checkpoint_dir, "--epochs", "200"))],
                             cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (checkpoint_dir / "last.pt").exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        second = run_train(*tiny_run_args(cifar_dir, checkpoint_dir, "--resume"))
        assert second.returncode == 1 and first.poll() is None
        assert second.stderr.strip().splitlines() == [
            f"error: another run is training in {checkpoint_dir}: wait for it to end, or use another --checkpoint-dir"]
    finally:
        first.kill()
        first.wait()
    assert run_train(*tiny_run_args(cifar_dir, checkpoint_dir, "--resume", "--epochs", "2")).returncode == 0


def test_start_up_removes_only_its_own_temporaries(cifar_dir, tmp_path):
    checkpoint_dir = tmp_path / "ckpt"
    checkpoint_dir.mkdir()
    (checkpoint_dir / ".notes.tmp.txt").write_text("mine")
    (checkpoint_dir / ".last.pt.tmp4242").write_bytes(b"half a checkpoint")
    (checkpoint_dir / ".best.pt.tmp1").mkdir()
    assert run_train(*tiny_run_args(cifar_dir, checkpoint_dir, "--epochs", "1")).returncode == 0
    names = {p.name for p in checkpoint_dir.iterdir()}
    assert {".notes.tmp.txt", ".best.pt.tmp1"} <= names and ".last.pt.tmp4242" not in names


def test_every_flag_is_a_setting_with_one_resume_rule():
    from dataclasses import fields

    from config import Config, OnResume, build_parser
    flags = {action.dest for action in build_parser()._actions} - {"help", "config", "resume", "evaluate"}
    assert flags == {setting.name for setting in fields(Config)}
    assert {OnResume.of(setting) for setting in fields(Config)} == set(OnResume)


def test_resume_keeps_the_checkpoints_recipe_but_this_commands_run_settings(train_main, cifar_dir, tmp_path):
    assert train_main(tiny_run_args(cifar_dir, tmp_path / "ckpt", "--epochs", "1", "--tta", "--test-batch-size",
                                    "8")) == 0
    assert train_main(tiny_run_args(cifar_dir, tmp_path / "ckpt", "--resume", "--epochs", "2")) == 0
    settings = load_checkpoint(tmp_path / "ckpt" / "last.pt")["args"]
    assert settings["tta"] is True  # a recipe setting: the checkpoint's, since none was given
    assert settings["test_batch_size"] == 1000 and settings["epochs"] == 2  # this command's default, and flag


def test_resume_refuses_a_changed_validation_split(train_main, cifar_dir, tmp_path, capsys):
    folder = tmp_path / "ckpt"
    assert train_main(tiny_run_args(cifar_dir, folder, "--epochs", "1", "--val-size", "20")) == 0
    checkpoint = torch.load(folder / "last.pt", weights_only=True)
    assert len(checkpoint["val_split"]) == 16
    checkpoint["val_split"] = "0123456789abcdef"  # as if other images had been held out
    torch.save(checkpoint, folder / "last.pt")
    capsys.readouterr()
    assert train_main(tiny_run_args(cifar_dir, folder, "--resume", "--epochs", "2")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another validation split" in err[0]


def test_train_images_is_shown_recorded_and_fixed_on_resume(train_main, cifar_dir, tmp_path, capsys):
    folder = tmp_path / "ckpt"

    def run(*flags):
        return train_main([*tiny_run_args(cifar_dir, folder, *flags), "--batch-size", "8"])
    assert run("--epochs", "1", "--train-images", "40") == 0
    out = capsys.readouterr().out
    assert "training on 40 images (a class-balanced subset, --train-images)" in out and "--train-images 40" in out
    checkpoint = load_checkpoint(folder / "last.pt")
    assert checkpoint["args"]["train_images"] == 40 and checkpoint["train_data"]["images"] == 40
    assert checkpoint["history"][0]["images"] == 40  # 5 whole batches of 8
    assert run("--resume", "--epochs", "2", "--train-images", "64") == 1
    assert "was trained with --train-images 40; refusing --train-images 64" in capsys.readouterr().err
    assert run("--resume", "--epochs", "2") == 0  # the same 40 images
    assert load_checkpoint(folder / "last.pt")["history"][1]["images"] == 40


def test_a_resume_on_another_number_of_processes_goes_on_and_says_it_will_not_match(train_main, cifar_dir, tmp_path,
                                                                                     capsys):
    folder = tmp_path / "ckpt"
    assert train_main(tiny_run_args(cifar_dir, folder, "--epochs", "1")) == 0
    checkpoint = load_checkpoint(folder / "last.pt")
    checkpoint["rng"] = checkpoint["rng"] * 2  # as two torchrun processes write it: one generator state each
    torch.save(checkpoint, folder / "last.pt")
    capsys.readouterr()
    assert train_main(tiny_run_args(cifar_dir, folder, "--resume", "--epochs", "2")) == 0
    assert (f"note: {folder / 'last.pt'} was trained by 2 processes and this run has 1: it goes on, but will not "
            "match, bit for bit, the run that kept its number of processes") in capsys.readouterr().err
    assert json.loads((folder / "config.json").read_text())["world_size"] == 1  # the checkpoint this process wrote


def test_a_resume_on_other_training_data_names_the_change_not_damage(train_main, tmp_path, capsys):
    from conftest import write_cifar100
    trained_on, other = write_cifar100(tmp_path / "small", train_size=64), write_cifar100(tmp_path / "big",
                                                                                          train_size=96)
    folder = tmp_path / "ckpt"
    assert train_main(tiny_run_args(trained_on, folder, "--epochs", "1")) == 0
    saved = load_checkpoint(folder / "last.pt")["train_data"]
    assert saved["images"] == 64 and len(saved["fingerprint"]) == 8
    before = (folder / "last.pt").read_bytes()
    capsys.readouterr()
    assert train_main(tiny_run_args(other, folder, "--resume", "--epochs", "2")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "damaged" not in err[0], err
    assert f"was trained on other data: 64 training images (fingerprint {saved['fingerprint']}), this run has 96 " \
        "(fingerprint " in err[0]
    assert (folder / "last.pt").read_bytes() == before
    assert train_main(tiny_run_args(trained_on, folder, "--resume", "--epochs", "2")) == 0  # its own data: goes on


def test_without_a_terminal_progress_lines_show_each_epoch_with_its_eta(train_main, cifar_dir, tmp_path, capsys,
                                                                         monkeypatch):
    import report
    monkeypatch.setattr(report, "PROGRESS_SECONDS", 0)  # a line at every sync point, not once a minute
    assert train_main(tiny_run_args(cifar_dir, tmp_path / "ckpt", "--epochs", "2")) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  epoch ")]
    assert len(lines) == 2 * 4  # 4 steps an epoch, each a sync point
    assert re.fullmatch(r"  epoch 2/2: step 3/4 \| loss \d+\.\d{4} \| lr \d\.\d{5} \| [\d,]+ img/s \| epoch ETA "
                        r"0:00:0\d", lines[-2]), lines[-2]


def test_without_a_terminal_a_due_progress_line_does_not_wait_for_the_next_sync_point(train_main, tmp_path, capsys,
                                                                                      monkeypatch):
    import report
    from conftest import write_cifar100
    monkeypatch.setattr(report, "PROGRESS_SECONDS", 0)  # a line due after every step
    data = write_cifar100(tmp_path / "data", train_size=512)
    assert train_main(tiny_run_args(data, tmp_path / "ckpt", "--epochs", "1")) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  epoch ")]
    assert len(lines) == 32  # every step of 32, where the planned sync points are every third step and the last


def test_a_run_says_how_long_it_will_take_after_its_first_timed_steps(train_main, tmp_path, capsys):
    from conftest import write_cifar100
    data = write_cifar100(tmp_path / "data", train_size=512)
    assert train_main(tiny_run_args(data, tmp_path / "ckpt", "--epochs", "3", "--val-size", "64")) == 0
    out = capsys.readouterr().out.splitlines()
    estimates = [index for index, line in enumerate(out) if line.startswith("estimated time to the end")]
    assert len(estimates) == 1, out
    assert re.fullmatch(r"estimated time to the end: \d:\d\d:\d\d for 3 epochs \(\d:\d\d:\d\d training, about "
                        r"\d:\d\d:\d\d evaluating\), from 9 timed steps of epoch 1; each epoch line updates it",
                        out[estimates[0]]), out[estimates[0]]  # steps 2 to 10: the first is start-up work
    epoch_lines = [line for line in out if line.startswith("epoch ")]
    assert out.index(epoch_lines[0]) > estimates[0]
    assert [bool(re.search(r" \| ETA \d:\d\d:\d\d$", line)) for line in epoch_lines] == [True, True, False]
    capsys.readouterr()
    assert train_main(tiny_run_args(data, tmp_path / "ckpt", "--resume", "--epochs", "4", "--val-size", "64")) == 0
    assert "for 1 epoch (" in capsys.readouterr().out  # a resume estimates what is left


def test_the_estimate_adds_the_steps_augmentation_and_evaluations_left():
    from types import SimpleNamespace

    from config import Config, parse_args
    from report import describe_estimate
    config = Config.from_flags(parse_args(["--epochs", "3", "--batch-size", "128", "--val-size", "5000"])[0])
    images = SimpleNamespace(images=[0] * 5000)
    run = SimpleNamespace(config=config, train_loader=SimpleNamespace(steps_per_epoch=100), state=SimpleNamespace(
        epoch=0, step=0), runtime=SimpleNamespace(world_size=1, device=torch.device("cpu")), selection_loader=images, val_loader=images,
        test_loader=SimpleNamespace(images=[0] * 10_000))
    # 290 steps of 0.5 s and two more epochs' augmentation of 2 s: 149 s; 3 validations and the final model's and
    # best.pt's tests, 35,000 images at half a trained image's 0.5 / 128 s on a CPU: 68.4 s
    assert describe_estimate(run, 0.5, 2.0, steps_done=10, timed_steps=9).startswith(
        "estimated time to the end: 0:03:37 for 3 epochs (0:02:29 training, about 0:01:08 evaluating)")
    run.runtime = SimpleNamespace(world_size=1, device=torch.device("cuda"))  # a fifth of a trained image on a GPU
    assert "about 0:00:27 evaluating" in describe_estimate(run, 0.5, 2.0, steps_done=10, timed_steps=9)
    run.runtime = SimpleNamespace(world_size=1, device=torch.device("cpu"))
    with_ema_and_tta = replace(config, ema=0.999, tta=True)
    run.config = with_ema_and_tta  # 6 validations (the average and the raw weights), 2 tests; each image twice
    assert "about 0:03:15 evaluating" in describe_estimate(run, 0.5, 2.0, steps_done=10, timed_steps=9)


def test_a_resumed_run_says_which_epoch_its_start_up_was_in_and_what_this_process_did(train_main, cifar_dir,
                                                                                       tmp_path, capsys):
    common = tiny_run_args(cifar_dir, tmp_path / "ckpt", "--epochs", "3")
    assert train_main([*common, "--target-accuracy", "0.01", "--patience", "1"]) == 0
    capsys.readouterr()
    assert train_main([*common, "--resume", "--target-accuracy", "1.0"]) == 0
    out = capsys.readouterr().out
    assert "start-up work in epoch 2 (the first step)" in out
    assert "done after 3 epochs, 2 epochs of them in this process, in" in out


def test_a_missing_matplotlib_is_said_at_the_start_of_a_plot_run(train_main, cifar_dir, tmp_path, capsys,
                                                                  monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert train_main(tiny_run_args(cifar_dir, tmp_path / "ckpt", "--epochs", "1", "--plot")) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines()[0] == ("note: --plot will draw nothing: plotting needs matplotlib: pip install "
                                            "matplotlib")
    assert not (tmp_path / "ckpt" / "metrics.png").exists()


def test_resume_and_evaluate_take_a_run_folder_for_its_checkpoints(trained_folder, cifar_dir, train_main, capsys):
    assert train_main(["--evaluate", str(trained_folder), "--data-dir", str(cifar_dir), "--no-download"]) == 0
    assert f"{trained_folder / 'best.pt'}: test loss" in capsys.readouterr().out
    args = [arg for arg in tiny_run_args(cifar_dir, "x", "--resume", trained_folder, "--epochs", "2")
            if arg not in ("--checkpoint-dir", "x")]
    assert train_main(args) == 0
    assert load_checkpoint(trained_folder / "last.pt")["epoch"] == 2


def test_a_file_that_is_no_checkpoint_is_not_called_possibly_code(train_main, cifar_dir, capsys):
    assert train_main(["--evaluate", str(REPO / "README.md"), "--data-dir", str(cifar_dir), "--no-download"]) == 1
    assert capsys.readouterr().err.strip() == f"error: {REPO / 'README.md'} is not a checkpoint: torch.save did " \
                                              f"not write it"


def test_eval_every_and_save_every_look_and_write_only_when_due(train_main, cifar_dir, tmp_path, capsys,
                                                               monkeypatch):
    import run_dir
    written = []
    monkeypatch.setattr(run_dir, "checkpoint_bytes", lambda checkpoint, real=run_dir.checkpoint_bytes: (
        written.append(checkpoint["epoch"]), real(checkpoint))[1])
    capsys.readouterr()
    assert train_main(tiny_run_args(cifar_dir, tmp_path / "ckpt", "--epochs", "5", "--eval-every", "2",
                                    "--save-every", "3")) == 0
    history = load_checkpoint(tmp_path / "ckpt" / "last.pt")["history"]
    assert [row["epoch"] for row in history if "test_top1" in row] == [2, 4, 5]  # every 2nd, and the last
    assert set(written) <= {2, 3, 4, 5} and {3, 5} <= set(written)  # every 3rd and the last; a best when evaluated
    assert not [epoch for epoch in written if epoch not in (3, 5) and not history[epoch - 1]["best"]]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert "test loss" not in lines[0] and "test loss" in lines[1] and len(lines) == 5
    assert len(read_metrics(tmp_path / "ckpt" / "metrics.csv")) == 5
