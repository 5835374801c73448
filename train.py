"""Train ResNet18 or WideResNet on CIFAR-100.

    python train.py                          # ResNet18, 100 epochs, batch 128
    python train.py --preset fast            # ResNet18 to 75 % top-1 in the fewest seconds
    python train.py --resume                 # continue checkpoint/last.pt
    python train.py --evaluate               # test checkpoint/best.pt and exit
    torchrun --nproc_per_node=4 train.py     # the same run on 4 GPUs

`main` answers a wrong flag and what the file system alone can tell (a missing checkpoint, a folder that holds
another run) before torch loads; `train` then reads top to bottom: the run folder, the settings, the data, the
run built whole, its epochs, its final tests and its summary.
"""
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

from cli import STOP_SIGNALS, STOPPED_STARTING, Stopped, exit_worker, quit_while_starting, raise_stopped
from config import Config, parse_args, resumed_config, setting_sources
from checkpoint_file import CheckpointError, describe_position, load_checkpoint
from data_files import DataError, check_data_dir
from launch import LaunchError, check_launch, is_distributed, next_restart, rank
from report import (Notes, describe_finished, describe_outcome, describe_run, describe_start_up_work, draw_plot, fail,
                    open_tensorboard, plot_is_possible, resume_command, show)
from run_dir import RunDir


def main(argv=None):
    """`python train.py`: returns the exit code."""
    saved, sys.stderr = sys.stderr, Notes(sys.stderr)
    try:
        args, explicit = parse_args(argv)
        try:  # checked again under the folder's lock; here, before seconds go on loading torch
            first_look(args, explicit)
        except (CheckpointError, DataError, LaunchError) as err:
            return stop_with_the_group(args, err) if is_distributed() else fail(err)
        for signum in STOP_SIGNALS:  # while torch loads: one line, not a traceback
            signal.signal(signum, quit_while_starting)
        return run(args, explicit)
    finally:
        sys.stderr = saved


def checkpoint_path(given, checkpoint_dir, name):
    """The checkpoint --resume or --evaluate names: PATH, a run folder's `name`, or the --checkpoint-dir's."""
    path = Path(given) if given else Path(checkpoint_dir) / name
    return path / name if path.is_dir() else path


def run_folder(args, explicit):
    """(the checkpoint a run resumes or None, the folder it trains in): a resume goes on in its checkpoint's
    folder unless --checkpoint-dir says otherwise; `--resume auto` from the folder's last.pt if it has one."""
    if args.resume in (None, "auto"):
        folder = Path(args.checkpoint_dir)
        return (folder / RunDir.LAST if args.resume and (folder / RunDir.LAST).is_file() else None), folder
    source = checkpoint_path(args.resume, args.checkpoint_dir, RunDir.LAST)
    return source, Path(args.checkpoint_dir) if "checkpoint_dir" in explicit else source.parent


def first_look(args, explicit):
    """What can be told from the file system alone: a launch that makes no one run, a data folder that cannot
    hold the data, a missing checkpoint, a folder that already holds a run. Under torchrun the run folder is rank
    0's alone (it may be on rank 0's node alone): the other ranks look at their data."""
    check_launch()
    check_data_dir(args.data_dir, not args.no_download)
    if rank() != 0:
        return
    if args.evaluate is not None:
        path = checkpoint_path(args.evaluate, args.checkpoint_dir, RunDir.BEST)
        if not path.is_file():
            raise CheckpointError(f"no checkpoint at {path}")
        return
    source, folder = run_folder(args, explicit)
    run_dir = RunDir(folder)
    run_dir.check_can_hold(run_dir.relaunched_source(source))


def stop_with_the_group(args, error):
    """Under torchrun, a check that failed before torch loaded: said once (by rank 0, or for what a node's ranks
    all see, by its first), then this rank joins the others to stop with them, so that none waits for it."""
    fail(error)
    from device_utils import DeviceError, any_rank, setup_runtime, teardown_runtime
    try:
        runtime = setup_runtime(args.device, args.dist_timeout)
    except DeviceError:  # the others cannot be reached: this rank has said why it stops
        return 1
    try:
        any_rank(True, runtime)
    finally:
        teardown_runtime(runtime)
    return 1


def run(args, explicit):
    """torch loaded, the device set up (the data read beside it), then the training or --evaluate; every error of
    the user's making is one line."""
    from dataset_utils import DataReader  # the first of them loads torch
    from device_utils import DeviceError, any_rank, leave_together, on_main_rank, setup_runtime, teardown_runtime
    from class_report import report_checkpoint
    from evaluation import evaluate_checkpoint
    from train_step import NonFiniteLossError
    for signum in STOP_SIGNALS:  # from here to the first step a stop is handled below, as Ctrl-C is
        signal.signal(signum, raise_stopped)
    reader = DataReader(args.data_dir, not args.no_download)
    try:
        runtime = setup_runtime(args.device, args.dist_timeout)
    except DeviceError as err:
        return fail(err)
    try:
        if runtime.distributed and any_rank(False, runtime):  # a rank stopped before torch loaded, and said why
            return 1
        if args.evaluate is not None:
            path = checkpoint_path(args.evaluate, args.checkpoint_dir, RunDir.BEST)
            checkpoint = on_main_rank(runtime, lambda: load_checkpoint(path), share=True)
            config = resumed_config(args, explicit, checkpoint, path)
            code = evaluate_checkpoint(checkpoint, path, config, runtime=runtime, arrays=reader.arrays())
            if runtime.is_main:
                show(report_checkpoint(checkpoint, path, config, reader.arrays(), runtime.device))
            return code
        code = train(args, explicit, runtime, reader)
        if runtime.distributed:  # finished, or an interrupt every rank agreed on: rank 0 has saved and said so
            leave_together(runtime)
        return code
    except (CheckpointError, DataError, DeviceError, NonFiniteLossError) as err:
        code = fail(err)
        if getattr(err, "every_rank_stops", False):
            leave_together(runtime)
        return code
    except Stopped as stop:
        return fail(STOPPED_STARTING, code=128 + stop.signum)
    finally:
        teardown_runtime(runtime)


def train(args, explicit, runtime, reader):
    """The run folder claimed (the lock before any read), the settings (a resume's merged with its checkpoint's),
    the data on the device, the run built and fitted, then tested and summed up; returns the exit code."""
    from dataset_utils import load_cifar100
    from device_utils import DeviceError, describe_lost_peer, on_main_rank
    from class_report import report_checkpoint
    from evaluation import test_final_and_best
    from train_step import NonFiniteLossError
    from train_utils import build_run, fit
    source, folder = run_folder(args, explicit)
    run_dir = RunDir(folder)
    try:
        resumed = on_main_rank(runtime, lambda: run_dir.claim(source), share=True)  # (checkpoint, its path)
        config = Config.from_flags(args) if resumed is None else resumed_config(args, explicit, *resumed)
        sources = args.sources if resumed is None else setting_sources(explicit, [(resumed[1], resumed[0]["args"])])
        config = replace(config, checkpoint_dir=str(folder))
        if config.sync_bn and runtime.device.type != "cuda":
            raise DeviceError("--sync-bn needs CUDA GPUs (SyncBatchNorm has no CPU implementation)")
        loaders = load_cifar100(config, runtime, reader.arrays())
        run = build_run(config, runtime, loaders, run_dir=run_dir, resumed=resumed)
        if resumed is not None:  # the checkpoint fits this run: the folder may take it in now
            on_main_rank(runtime, lambda: run_dir.adopt(*resumed))
            if run.state.epoch >= config.epochs:  # taken in and repaired, and nothing left to train
                if runtime.is_main:
                    print(describe_finished(*resumed, explicit), file=sys.stderr)
                return 0
        if config.tensorboard and runtime.is_main:
            run.tensorboard = open_tensorboard(run_dir.tensorboard)
        if runtime.is_main:
            show(describe_run(run, resumed, sources), run.interrupt)
        plot = config.plot and runtime.is_main and plot_is_possible()
        run.interrupt.install()
        epochs_before, started = run.state.epoch, time.perf_counter()
        try:
            outcome = fit(run)
        except NonFiniteLossError as err:
            kept = (f"the last good checkpoint, {run_dir.last}, left as it was" if run_dir.last.exists()
                    else "no checkpoint written yet")
            raise NonFiniteLossError(f"{err}; stopped with {kept}") from None
        except Exception as err:
            lost = describe_lost_peer(err, runtime)
            if lost is None:
                raise
            stopped = DeviceError(f"{lost}; {after_a_lost_peer(run_dir, explicit)}" if runtime.is_main else lost)
            stopped.shown_by_rank_0 = not runtime.is_main  # said once, where the folder is
            raise stopped from None
        final_tests = test_final_and_best(run) if run.val_loader is not None and outcome != "interrupted" else None
        if runtime.is_main:
            show(describe_start_up_work(run, epochs_before + 1), run.interrupt)
            show(describe_outcome(run, outcome, time.perf_counter() - started, epochs_before=epochs_before,
                                  final_tests=final_tests), run.interrupt)
            if outcome == "interrupted":
                print(f"stopped at epoch {run.state.epoch + 1}, step {run.state.step}; checkpoint saved. Resume "
                      f"with:\n  {resume_command(run_dir.last, explicit)}", file=sys.stderr)
            if plot and run.state.history:
                draw_plot(run_dir)
            if config.report and outcome != "interrupted" and run_dir.best.exists():
                show(report_checkpoint(load_checkpoint(run_dir.best), run_dir.best, config, reader.arrays(),
                                       runtime.device), run.interrupt)
        return 128 + run.interrupt.signum if outcome == "interrupted" else 0
    finally:
        run_dir.close()  # every write has finished: another run may use the folder now


def after_a_lost_peer(run_dir, explicit):
    """What a run that lost a peer process keeps, and how it goes on from there."""
    if not run_dir.last.exists():
        return "no checkpoint written yet"
    restart = next_restart()
    goes_on = (f"torchrun starts the run again from there ({restart})" if restart else
               f"resume with:\n  {resume_command(run_dir.last, explicit)}")
    return f"{run_dir.last} holds {describe_position(load_checkpoint(run_dir.last))}; {goes_on}"


if __name__ == "__main__":
    code = main()
    if is_distributed():
        exit_worker(code)
    sys.exit(code)
