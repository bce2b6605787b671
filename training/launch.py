"""torchrun, with a sentence where torchrun ends in a traceback: ``python -m training.launch`` takes torchrun's flags.

    python -m training.launch --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint node0:29400 \\
        --rdzv-id city --rdzv-conf join_timeout=600 --max-restarts 3 -m training.run --dataset cityscapes ...

A rendezvous that times out (a node never joined) ends with one sentence and exit code 2 instead of
torchrun's ``RendezvousTimeoutError`` traceback; everything else is torchrun's own behaviour and exit code.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.errors import record
from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError
from torch.distributed.run import parse_args, run

# torchrun's join_timeout when --rdzv-conf does not set it (torch.distributed.elastic.rendezvous).
DEFAULT_JOIN_TIMEOUT_S = 600


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        record(run)(args)  # as torchrun's main: a failed worker's error summary, then its exit code
    except RendezvousTimeoutError:
        conf = dict(item.split("=", 1) for item in (args.rdzv_conf or "").split(",") if "=" in item)
        timeout = conf.get("join_timeout", DEFAULT_JOIN_TIMEOUT_S)
        print(f"error: the rendezvous at {args.rdzv_endpoint} (--rdzv-id {args.rdzv_id}) timed out after {timeout} "
              f"s with fewer than --nnodes {args.nnodes} node(s) joined. Start the same command on the other nodes "
              "(same --rdzv-endpoint and --rdzv-id), or set --rdzv-conf join_timeout=SECONDS", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
