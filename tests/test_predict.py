"""predict.py on image files: the same class as load_model and normalize give for the same tensor, and one line for
each input that names no image while the others are still classified."""
import json

import pytest
import torch

from augment import normalize
from conftest import tiny_run_args
from dataset_utils import read_cifar100
from train_utils import load_model

torchvision = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import train
    from conftest import write_cifar100
    root = tmp_path_factory.mktemp("predict")
    cifar_dir = write_cifar100(root / "data")
    assert train.main(tiny_run_args(cifar_dir, root / "ckpt", "--epochs", 2)) == 0
    return cifar_dir, root / "ckpt" / "best.pt"


def test_a_test_image_saved_as_png_gets_the_class_the_model_gives_its_tensor(trained, tmp_path, capsys):
    import predict
    from torchvision.io import write_png
    cifar_dir, checkpoint = trained
    arrays = read_cifar100(cifar_dir)
    model = load_model(checkpoint)
    for index in range(4):
        write_png(arrays.test_images[index], str(tmp_path / f"{index}.png"))
    capsys.readouterr()
    assert predict.main([str(tmp_path), "--checkpoint", str(checkpoint), "--data-dir", str(cifar_dir), "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    with torch.inference_mode():
        expected = model(normalize(arrays.test_images[:4].float() / 255)).softmax(1)
    for index, line in enumerate(lines):
        result = json.loads(line)
        assert result["image"] == str(tmp_path / f"{index}.png")
        top = expected[index].topk(5)
        assert [entry["class"] for entry in result["top5"]] == [arrays.classes[i] for i in top.indices.tolist()]
        assert [entry["probability"] for entry in result["top5"]] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_each_input_that_names_no_image_is_one_line_and_the_others_are_classified(trained, tmp_path, capsys):
    import predict
    from torchvision.io import write_jpeg
    cifar_dir, checkpoint = trained
    picture = torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8)  # not square: centre-cropped, then resized
    write_jpeg(picture, str(tmp_path / "photo.jpg"))
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    code = predict.main([str(tmp_path / "photo.jpg"), str(tmp_path / "notes.png"), str(tmp_path / "missing.png"),
                         str(tmp_path / "empty"), "--checkpoint", str(checkpoint), "--data-dir", str(cifar_dir)])
    out, err = capsys.readouterr()
    assert code == 1
    (line,) = out.splitlines()
    assert line.startswith(f"{tmp_path / 'photo.jpg'}: class_") and line.count(", ") == 4
    assert err.splitlines() == [f"error: {tmp_path / 'notes.png'}: not a readable PNG or JPEG image",
                                f"error: {tmp_path / 'missing.png'}: no such file",
                                f"error: {tmp_path / 'empty'}: no PNG or JPEG files in this folder"]


def test_a_checkpoint_that_is_not_one_is_one_line(tmp_path, capsys):
    import predict
    (tmp_path / "best.pt").write_text("no")
    assert predict.main([str(tmp_path / "x.png"), "--checkpoint", str(tmp_path / "best.pt")]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'best.pt'} is not a checkpoint: torch.save did not write it\n"


def test_the_image_is_cropped_to_its_centre_square_and_resized_with_antialiasing(tmp_path):
    import predict
    from torchvision.io import write_png
    from torchvision.transforms.v2 import functional as TF
    picture = torch.randint(0, 256, (3, 40, 100), dtype=torch.uint8)
    write_png(picture, str(tmp_path / "wide.png"))
    expected = TF.resize(picture[:, :, 30:70], [32, 32], antialias=True)
    assert torch.equal(predict.as_training_image(tmp_path / "wide.png"), normalize(expected[None].float() / 255))


def test_without_torchvision_predict_says_so_in_one_line(monkeypatch, capsys):
    import sys

    import predict
    monkeypatch.setitem(sys.modules, "torchvision", None)
    assert predict.main(["photo.png"]) == 1
    assert capsys.readouterr().err == "error: reading images needs torchvision: pip install torchvision\n"
