"""`python train.py --config FILE`: a new run from a saved config.json or a hand-written one, flags given on top."""
import json

import pytest

from conftest import TINY_MODEL, assert_same_weights, load_weights, tiny_run_args
from config import parse_args


def write_json(path, settings):
    path.write_text(json.dumps(settings))
    return path


def test_a_run_from_another_runs_config_json_ends_with_its_weights_to_the_bit(train_main, cifar_dir, tmp_path,
                                                                              capsys):
    first = tmp_path / "first"
    assert train_main(tiny_run_args(cifar_dir, first, "--epochs", 2, "--lr", 0.05, "--label-smoothing", 0.1,
                                    "--flip", "alternate", "--cutout", 8, "--seed", 3)) == 0
    capsys.readouterr()
    again = tmp_path / "again"  # this command names only where it runs: the recipe is the file's
    assert train_main(["--config", str(first / "config.json"), "--data-dir", str(cifar_dir), "--no-download",
                       "--checkpoint-dir", str(again)]) == 0
    out = capsys.readouterr().out
    assert (f"recipe: {' '.join(TINY_MODEL)} --batch-size 16 --lr 0.05 --label-smoothing 0.1 --cutout 8 --flip "
            f"alternate --seed 3 --epochs 2 ({first / 'config.json'})\n") in out
    assert_same_weights(load_weights(first / "last.pt"), load_weights(again / "last.pt"))
    saved, original = (json.loads((folder / "config.json").read_text()) for folder in (again, first))
    assert (saved.pop("checkpoint_dir"), original.pop("checkpoint_dir")) == (str(again), str(first))
    assert saved == original


def test_flags_given_win_over_the_file_and_the_file_over_its_preset(tmp_path):
    file = write_json(tmp_path / "recipe.json", {"preset": "cpu", "lr": 0.3, "epochs": 5, "cutout": 8})
    args, explicit = parse_args(["--config", str(file), "--epochs", "7"])
    assert (args.model, args.depth, args.nesterov) == ("wideresnet", 10, True)  # the preset the file names
    assert (args.lr, args.cutout, args.epochs) == (0.3, 8, 7)  # the file over its preset, the flag over the file
    assert (args.sources["depth"], args.sources["lr"], args.sources["epochs"]) == ("--preset cpu", str(file), "given")
    assert explicit == {"config": str(file), "epochs": 7}
    typed_preset, _ = parse_args(["--config", str(file), "--preset", "fast"])  # typed: over the file
    assert (typed_preset.batch_size, typed_preset.lr, typed_preset.model) == (512, 0.4, "wideresnet")
    batch_job, _ = parse_args(["--config", str(file), "--resume", "auto"])  # a repeated job: starts, then goes on
    assert batch_job.lr == 0.3


def test_a_run_folder_stands_for_its_config_json_and_how_that_run_was_launched_is_left_out(tmp_path, capsys):
    write_json(tmp_path / "config.json", {"lr": 0.3, "checkpoint_dir": "elsewhere", "data_dir": "/nowhere",
                                          "device": "cuda", "world_size": 4})
    args, _ = parse_args(["--config", str(tmp_path)])
    assert (args.lr, args.checkpoint_dir, args.data_dir, args.device) == (0.3, "checkpoint", "data", "auto")
    assert (f"note: {tmp_path / 'config.json'} was trained by 4 processes and this run has 1: the same recipe, but "
            "not the same numbers, bit for bit") in capsys.readouterr().err


@pytest.mark.parametrize("content, fragments", [
    ({"lr": 0.1, "learning_rate": 0.2}, ["train.py has no setting 'learning_rate'"]),
    ({"epochs": "ten"}, ["epochs is 'ten', which --epochs refuses", "'ten' is not a valid int"]),
    ({"epochs": 12.5}, ["epochs is 12.5, which --epochs refuses"]),
    ({"epochs": None}, ["epochs is None, which --epochs cannot give"]),
    ({"cutout": False}, ["cutout is False, which --cutout cannot give"]),
    ({"lr": -0.1}, ["lr is -0.1, which --lr refuses", "must be above 0"]),
    ({"label_smoothing": 1.5}, ["label_smoothing is 1.5", "must be in [0, 1)"]),
    ({"model": "vgg16"}, ["model is 'vgg16', which --model refuses"]),
    ({"preset": "slow"}, ["preset is 'slow', which --preset refuses"]),
    ({"nesterov": "yes"}, ["nesterov is 'yes', but --nesterov is a switch: true or false"]),
    ({"asam": True}, ["--asam needs --sam"]),
    ({"depth": 12}, ["--depth: 12 is not 6n+4"]),
    ({"world_size": 0}, ["world_size is 0, not a number of processes"]),
    ([0.1], ["holds a JSON list, not an object of settings"]),
    ("{not json", ["is not JSON"]),
    (b"\x80\x02", ["is not JSON (not UTF-8 text)"]),
    (None, ["No such file or directory"]),
])
def test_a_bad_config_file_is_one_line_naming_the_key_and_exit_2(train_main, tmp_path, capsys, content, fragments):
    file = tmp_path / "config.json"
    if isinstance(content, bytes):
        file.write_bytes(content)
    elif isinstance(content, str):
        file.write_text(content)
    elif content is not None:
        write_json(file, content)
    with pytest.raises(SystemExit) as exited:
        train_main(["--config", str(file), "--checkpoint-dir", str(tmp_path / "run")])
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f": error: --config {file}" in lines[0], lines
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    assert not (tmp_path / "run").exists()


def test_a_folder_without_config_json_is_one_line_naming_the_file_it_lacks(train_main, tmp_path, capsys):
    folder = tmp_path / "not_a_run"
    folder.mkdir()
    with pytest.raises(SystemExit) as exited:
        train_main(["--config", str(folder), "--checkpoint-dir", str(tmp_path / "run")])
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"--config {folder / 'config.json'}: No such file" in lines[0], lines
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("other", [["--resume"], ["--resume", "somewhere/last.pt"], ["--evaluate"]])
def test_config_starts_a_new_run_and_so_excludes_resume_and_evaluate(train_main, tmp_path, capsys, other):
    file = write_json(tmp_path / "recipe.json", {"lr": 0.3})
    with pytest.raises(SystemExit) as exited:
        train_main(["--config", str(file), *other])
    assert exited.value.code == 2
    assert "--config starts a new run: it excludes --resume (all but --resume auto) and --evaluate" in capsys.readouterr().err


def test_a_resumed_run_says_its_recipe_is_its_checkpoints_and_the_flags_given_now(train_main, cifar_dir, tmp_path,
                                                                                   capsys):
    folder = tmp_path / "run"
    assert train_main(tiny_run_args(cifar_dir, folder, "--epochs", 1, "--lr", 0.05)) == 0
    capsys.readouterr()
    assert train_main(tiny_run_args(cifar_dir, folder, "--resume", "--epochs", 2)) == 0
    assert (f"recipe: --lr 0.05 ({folder / 'last.pt'}); {' '.join(TINY_MODEL)} --batch-size 16 --epochs 2 (given)\n"
            in capsys.readouterr().out)
