"""`shard_tool push`: placeholder until the edge agent's store lands (issue 3)."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("push", help="send an expert shard to an edge agent")
    p.set_defaults(func=lambda args: (_ for _ in ()).throw(SystemExit("push: not built yet")))
