"""Classify image files with a trained checkpoint: the top-5 classes of each, one line an image.

    python predict.py photo.jpg more/ --checkpoint checkpoint/best.pt
    python predict.py photo.jpg --json

Each image becomes what the model was trained on: RGB, centre-cropped to a square if it is not one, resized to
32 x 32 with antialiasing, then normalised as in training. Reading images needs torchvision.
"""
import json
import sys
from pathlib import Path

from cli import Parser

SUFFIXES = (".png", ".jpg", ".jpeg")


class InputError(RuntimeError):
    """An input that names no image: said in one line, and the others are still classified."""


def image_files(paths):
    """(file, None) for each image named or found in a named folder (sorted), (path, InputError) for the rest."""
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(entry for entry in path.iterdir() if entry.suffix.lower() in SUFFIXES and entry.is_file())
            if not found:
                yield path, InputError(f"{path}: no PNG or JPEG files in this folder")
            yield from ((entry, None) for entry in found)
        elif not path.exists():
            yield path, InputError(f"{path}: no such file")
        else:
            yield path, None


def as_training_image(path):
    """The file at `path` as a normalised (1, 3, 32, 32) float tensor, made as the training images were."""
    import torch
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2 import functional as TF

    from augment import normalize
    try:
        image = decode_image(str(path), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError, OSError):  # torchvision's message names its own C++ source
        raise InputError(f"{path}: not a readable PNG or JPEG image") from None
    side = min(image.shape[-2:])
    image = TF.resize(TF.center_crop(image, [side, side]), [32, 32], antialias=True)
    return normalize(image[None].to(torch.float32).div_(255))


def class_names(data_dir, count):
    """The class names from the data's meta file, or their numbers where it cannot be read."""
    from data_files import DataError
    from dataset_utils import as_text, unpickle
    try:
        names = unpickle(Path(data_dir) / "cifar-100-python" / "meta", "meta file").get("fine_label_names")
    except DataError:
        names = None
    if not isinstance(names, list) or len(names) != count:
        print(f"note: no class names in {data_dir} (its cifar-100-python/meta): classes are shown by number",
              file=sys.stderr)
        return [str(index) for index in range(count)]
    return [as_text(name) for name in names]


def main(argv=None):
    parser = Parser("Classify PNG or JPEG images with a trained checkpoint.")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders of them")
    parser.add_argument("--checkpoint", default="checkpoint/best.pt", help="the checkpoint to classify with")
    parser.add_argument("--data-dir", default="data", help="where cifar-100-python/meta gives the class names")
    parser.add_argument("--json", action="store_true", help="print one JSON object an image instead")
    args = parser.parse_args(argv)
    try:
        import torchvision  # noqa: F401
    except ImportError:
        print("error: reading images needs torchvision: pip install torchvision", file=sys.stderr)
        return 1
    import torch

    from checkpoint_file import CheckpointError
    from train_utils import load_model
    try:
        model = load_model(args.checkpoint)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    names, failed = None, False
    for path, problem in image_files(args.images):
        try:
            if problem is not None:
                raise problem
            with torch.inference_mode():
                probabilities = model(as_training_image(path)).float().softmax(1)[0]
        except InputError as err:
            print(f"error: {err}", file=sys.stderr)
            failed = True
            continue
        names = names or class_names(args.data_dir, len(probabilities))
        top = probabilities.topk(5)
        classes = [(names[index], probability) for probability, index in zip(top.values.tolist(),
                                                                                 top.indices.tolist())]
        if args.json:
            print(json.dumps({"image": str(path), "top5": [{"class": name, "probability": round(probability, 4)}
                                                           for name, probability in classes]}))
        else:
            print(f"{path}: " + ", ".join(f"{name} {probability:.3f}" for name, probability in classes))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
