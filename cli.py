"""Command-line plumbing shared by train.py, bench.py and plot.py: flag errors in one line, help that shows each
default once, numbers checked against their range, and a process's exits before and after its run. Imports nothing
heavy, so --help and flag errors answer at once."""
import argparse
import contextlib
import math
import os
import signal
import sys
import textwrap

from launch import rank

FLOAT32_MAX = 3.4028234663852886e38  # what a float setting must fit in: the training computes in float32


def bounded(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type that converts with `kind` and checks the value lies in the stated range (a float's within
    float32's, too); a value outside it is told the range in words."""
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if kind is float and math.isnan(value):
            raise argparse.ArgumentTypeError(f"{text} is not a number")
        if kind is float and abs(value) > FLOAT32_MAX:
            raise argparse.ArgumentTypeError(f"{text} is beyond float32's largest number, {FLOAT32_MAX:g}")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"{text} {describe_range(low, high, low_open, high_open)}")
        return value
    return convert


def describe_range(low, high, low_open, high_open):
    """'must be above 0', 'must be at least 1', 'must be at most 32', or 'must be in [0, 1)'."""
    if high is None:
        return f"must be {'above' if low_open else 'at least'} {bound_text(low)}"
    if low is None:
        return f"must be {'below' if high_open else 'at most'} {bound_text(high)}"
    return f"must be in {'(' if low_open else '['}{bound_text(low)}, {bound_text(high)}{')' if high_open else ']'}"


def bound_text(bound):
    return f"{bound:g}" if isinstance(bound, float) else str(bound)


def non_empty(text):
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path names no folder")
    return text


POSITIVE_INT = bounded(int, low=1)
NON_NEGATIVE_INT = bounded(int, low=0)
POSITIVE_FLOAT = bounded(float, low=0, low_open=True)
NON_NEGATIVE_FLOAT = bounded(float, low=0)
FRACTION = bounded(float, low=0, high=1, high_open=True)


class FlagError(ValueError):
    """A setting outside what its flag accepts."""


class HelpFormatter(argparse.HelpFormatter):
    """Every default shown once (not where the help says what the default does), none on a switch, and a flag's
    name never cut across two lines."""

    def _get_help_string(self, action):
        text = action.help
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS or \
                "(default" in text or ": off)" in text:
            return text
        return text + " (default: %(default)s)"

    def _split_lines(self, text, width):
        return textwrap.wrap(text, width, break_on_hyphens=False)


class Parser(argparse.ArgumentParser):
    """argparse with every default in --help, and flag errors in one line instead of behind the usage block; with
    `raising`, an error is a FlagError instead (for settings that come from a checkpoint, not a command line)."""

    def __init__(self, description, raising=False):
        super().__init__(description=description, formatter_class=HelpFormatter)
        self.raising = raising

    def error(self, message):
        if self.raising:
            raise FlagError(message)
        said_by_rank_0 = rank() != 0  # under torchrun every rank parses the same command: one line, not one a rank
        self.exit(2, None if said_by_rank_0 else f"{self.prog}: error: {message} (see python {self.prog} --help)\n")


def comma_separated(convert):
    """An argparse type: a comma-separated list, each item converted (and checked) by `convert`."""
    def convert_each(text):
        return [convert(item) for item in text.split(",")]
    return convert_each


def one_of(*choices):
    """An argparse type accepting only `choices` (used inside comma_separated lists)."""
    def check(text):
        if text not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(choices)}")
        return text
    return check


# Ctrl-C, a batch system or a kill, a closed terminal (Windows has no SIGHUP)
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Stopped(KeyboardInterrupt):
    """A stop signal while a run starts, raised where the main thread is, as Ctrl-C's KeyboardInterrupt is."""

    def __init__(self, signum=signal.SIGINT):
        super().__init__(signum)
        self.signum = signum


def raise_stopped(signum, frame):
    raise Stopped(signum)


@contextlib.contextmanager
def stop_signals_held():
    """Hold back a stop signal for the few calls that must not be cut between (a folder made and its lock taken,
    and that recorded): it is handled, by the handler it would have met, as soon as they are done."""
    held, previous = [], {}
    try:
        for signum in STOP_SIGNALS:
            previous[signum] = signal.signal(signum, lambda signum, frame: held.append(signum))
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if held:
            signal.raise_signal(held[0])


STOPPED_STARTING = "interrupted before training started; nothing needed saving"  # a stop at any point of start-up


def quit_while_starting(signum, frame):
    """A stop signal while torch loads, before anything is written: one line, not a traceback."""
    print(f"\nerror: {STOPPED_STARTING}", file=sys.stderr, flush=True)
    os._exit(128 + signum)


def exit_worker(code):
    """A torchrun worker leaves without running C++ teardown: on a loaded machine the process group's threads
    can abort it there ("terminate called without an active exception") after everything was done and saved."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def split_at_dashes(argv):
    """(a script's own flags, the flags after -- that it hands to the commands it runs)."""
    if "--" not in argv:
        return list(argv), []
    return list(argv[:argv.index("--")]), list(argv[argv.index("--") + 1:])
