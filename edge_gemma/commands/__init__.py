"""The `edge-gemma` subcommands that use artifacts: export, run, chat, inspect, bench (one module each, with
`add_arguments(parser)` and `run(args) -> int`; only these print)."""
