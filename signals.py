"""How a run is asked to stop: SIGINT, SIGTERM and SIGHUP, or a closed standard output, agreed by every rank."""
import os
import signal
import sys

from cli import STOP_SIGNALS
from device_utils import max_over_ranks


class Interrupt:
    """The first SIGINT, SIGTERM or SIGHUP asks the loop to stop at a step boundary; a second one quits at once.

    A closed standard output (`python train.py | head`) stops the run the same way, as SIGPIPE would. Under
    torchrun a signal may reach some ranks only: `agreed` tells every rank, with the signal that came.
    """

    def __init__(self, announce=True):
        self.signum = None
        self.announce = announce  # rank 0 says what happens; under torchrun each rank gets the launcher's signal

    def install(self):
        for signum in STOP_SIGNALS:
            signal.signal(signum, self.handle)

    def handle(self, signum, frame):
        if self.signum is not None:
            os._exit(128 + signum)  # safe: every file is written to a temporary name and renamed
        self.signum = signum
        if self.announce:
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (again to quit at once)",
                  file=sys.stderr, flush=True)

    def output_closed(self):
        if self.signum is None:
            self.signum = signal.SIGPIPE
            print("note: standard output was closed: saving a checkpoint and stopping", file=sys.stderr, flush=True)

    @property
    def requested(self):
        return self.signum is not None

    def agreed(self, runtime):
        """Whether any rank was asked to stop (a collective: every rank must call it)."""
        signum = max_over_ranks(self.signum or 0, runtime)
        if signum and self.signum is None:
            self.signum = signum
        return signum > 0


