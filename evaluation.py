"""How a model is tested: loss, top-1 and top-5 over a whole evaluation set, with test-time augmentation; the final
and best models of a run; and --evaluate of a checkpoint."""
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from checkpoint import load_model, model_from_checkpoint, model_with_weights
from dataset_utils import EvalLoader
from device_utils import all_reduce_sum, autocast, resolve_precision
from report import show


@dataclass
class EvalResult:
    loss: float
    top1: float
    top5: float
    seconds: float


def evaluate(model, loader, runtime, precision, views="image"):
    """Loss, top-1 and top-5 over a whole evaluation set (all ranks' shards), from the logits averaged over
    `views` (see `view_logits`).

    The model is left in the mode it came in.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, device=runtime.device)  # loss, top-1 hits, top-5 hits
    images = 0
    started = time.perf_counter()
    with torch.inference_mode(), autocast(runtime.device, precision):
        for batch, labels in loader:
            logits = view_logits(model, batch, views)
            top5 = logits.topk(5, dim=1).indices
            sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum"),
                                 (top5[:, 0] == labels).sum().float(),
                                 (top5 == labels[:, None]).any(1).sum().float()])
            images += len(labels)
    totals = torch.cat([sums, torch.tensor([float(images)], device=runtime.device)])
    loss_sum, top1, top5, count = all_reduce_sum(totals, runtime).tolist()
    model.train(was_training)
    return EvalResult(loss_sum / count, top1 / count, top5 / count, time.perf_counter() - started)


def view_logits(model, batch, views="image"):
    """Float logits of a batch of normalised images: "image" as it is; "mirror" averaged with its mirror;
    "crops" as airbench's test-time augmentation: half that pair, half the same pair of the two crops shifted one
    pixel up-left and down-right from the image padded by reflection (6 views)."""
    def with_mirror(images):
        return (model(images).float() + model(images.flip(-1)).float()) / 2

    if views == "image":
        return model(batch).float()
    if views == "mirror":
        return with_mirror(batch)
    size = batch.shape[-1]
    padded = F.pad(batch, (1, 1, 1, 1), mode="reflect")
    shifted = (with_mirror(padded[..., :size, :size]) + with_mirror(padded[..., 2:, 2:])) / 2
    return (with_mirror(batch) + shifted) / 2


def test_final_and_best(run):
    """With a validation split: the test set's verdict on the final model and on the best epoch's (best.pt)."""
    final = evaluate(run.evaluated_model, run.test_loader, run.runtime, run.precision, views=run.config.test_views)
    if run.best_weights is not None:
        best_model = model_with_weights(run.config.model_config, run.best_weights, run.runtime.device)
    else:  # a resumed run whose best epoch came before the resume finds it only in best.pt
        best_model = load_model(run.run_dir.best, run.runtime.device)
    best = evaluate(best_model, run.test_loader, run.runtime, run.precision, views=run.config.test_views)
    return final, best


VIEWS_TESTED = {"image": "", "mirror": " on each image and its mirror (--tta)",
                "crops": " on 6 views of each image (--tta-crops)"}


def evaluate_checkpoint(checkpoint, path, config, runtime, arrays):
    """--evaluate: test a checkpoint's model on the test set and print its accuracy next to the stored best."""
    model = model_from_checkpoint(checkpoint, path, runtime.device)
    test_loader = EvalLoader(arrays.test_images.to(runtime.device), arrays.test_labels.to(runtime.device),
                             config.test_batch_size, shard=(runtime.rank, runtime.world_size))
    result = evaluate(model, test_loader, runtime, resolve_precision(runtime.device, config.precision),
                      views=config.test_views)
    if runtime.is_main:
        show(f"{path}: test loss {result.loss:.4f}, top-1 {100 * result.top1:.2f}%, top-5 {100 * result.top5:.2f}%"
             f"{VIEWS_TESTED[config.test_views]} (stored best top-1 {100 * checkpoint['best_top1']:.2f}% after epoch "
             f"{checkpoint['epoch']})")
    return 0
