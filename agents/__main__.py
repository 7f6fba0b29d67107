"""``python -m agents <role> --home HOME --name NAME``: run one lab agent.

Roles: ``dns``, ``msa``, ``mta``, ``mda``; ``mua`` runs one MUA command
(``python -m agents mua send ...``), as the lab API and notebooks do.
"""

import argparse
import sys

from . import ROLE_MODULES


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "mua":
        from .mua import main as mua_main

        return mua_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m agents")
    parser.add_argument("role", choices=sorted(ROLE_MODULES))
    parser.add_argument("--home", required=True)
    parser.add_argument("--name", required=True, help="agent name, e.g. mta.sender.test")
    args = parser.parse_args(argv)
    from .runtime import run

    return run(args.role, args.home, args.name)


if __name__ == "__main__":
    sys.exit(main())
