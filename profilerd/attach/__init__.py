"""`profilerd attach PID`: diagnose a training process that is already running.

Three layers, from least to most privileged; the best one available is used and named:

- L0 (no privileges): psutil on the target, its threads and its DataLoader workers, plus the
  host. Enough to tell input-bound from CPU-bound from host-bound (:mod:`.sampling`).
- L1 (ptrace): py-spy samples the target's Python stacks without pausing it (``--nonblocking``);
  the share of training-thread samples in DataLoader ``__next__``, forward, backward, the
  optimizer and collectives gives the step-phase fractions without probes (:mod:`.sampling`).
- L2 (inject): the probes themselves, installed in the live interpreter (``sys.remote_exec`` on
  Python >= 3.14; on older Pythons an experimental gdb injection that is off by default), and
  removed again on detach (:mod:`.inject`).

The modules, in the order an attach uses them: :mod:`.target` (is the pid a Python with torch),
:mod:`.sampling` (L0, L1), :mod:`.watch` (observing for a while, or continuously for the live
view), :mod:`.verdict` (the one diagnosis over what the layers saw, as a verdict document),
:mod:`.inject` (L2's lifecycle), :mod:`.recording` (keeping the verdict) and :mod:`.command`
(the `attach` command's flow; the CLI only parses its flags).
"""
