"""`python -m recipe_dist.launch NPROC COMMAND [ARGS...]`: torchrun's standalone launch, one line on failure.

The same elastic agent as `torchrun --standalone --nproc_per_node=NPROC -m recipe_dist ...`
(torch.distributed.run, called as a library), with one difference a user sees: when a rank
fails, torchrun wraps the rank's own one-line error in a ~40-line ChildFailedError traceback
and failure table. Here the rank's error stays the last thing it printed, the agent's own log
lines are kept to errors of the agent itself, and the launcher adds one line naming the first
rank that failed and its exit code, then exits with that code (a rank killed by a signal: 128+N,
as a shell reports it).
"""

from __future__ import annotations

import logging
import signal
import sys


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].isdigit() or int(argv[0]) < 1:
        print("usage: python -m recipe_dist.launch NPROC <recipe-dist command> [args...]", file=sys.stderr)
        return 2
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # --standalone picks a free rendezvous port, so several local jobs can run side by side.
    args = get_args_parser().parse_args(["--standalone", f"--nproc_per_node={argv[0]}", "-m", "recipe_dist", *argv[1:]])
    # The agent logs each failed rank and each SIGTERM it sends to the others; the ranks have said why.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}"
            print(f"launch: rank {rank} was killed by {name}", file=sys.stderr)
            return 128 - code
        print(f"launch: rank {rank} exited with code {code} (its message is above)", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
