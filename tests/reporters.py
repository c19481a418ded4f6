"""Reporters that stand in for a trial's failure and restart (what Tune does after a crash), for the checkpoint
tests of every job."""

import copy

from teachsweep.reporter import Reporter


class CrashAfter(Reporter):
    """Keeps each epoch's checkpoint (a copy, as a saved file would be) and fails after epoch `epochs`."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs

    def report(self, metrics, epoch, checkpoint=None):
        super().report(metrics, epoch, checkpoint=copy.deepcopy(checkpoint))
        if epoch == self.epochs:
            raise RuntimeError("simulated crash")


class Resume(Reporter):
    """A restarted trial: `restore` hands back the checkpoint it was given."""

    def __init__(self, saved):
        super().__init__()
        self.from_checkpoint = saved

    def restore(self):
        return self.from_checkpoint
