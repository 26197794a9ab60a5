"""`python -m training.fit`, but each process raises SystemExit when it is about to take
optimizer step $CRASH_AT + 1: a job killed mid-run, for the resume tests (under torchrun)."""

from __future__ import annotations

import os
import sys

from training import fit as fit_mod

CRASH_AT = int(os.environ["CRASH_AT"])
_step = fit_mod._Trainer._optimizer_step


def _crashing_step(self: fit_mod._Trainer) -> float:
    if self.step == CRASH_AT:
        raise SystemExit(f"simulated crash at step {self.step}")
    return _step(self)


if __name__ == "__main__":
    fit_mod._Trainer._optimizer_step = _crashing_step
    sys.exit(fit_mod.main(sys.argv[1:]))
