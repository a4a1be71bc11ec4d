"""`python -m keepsrc.server`: the same as `keepsrc serve`."""

import argparse

from keepsrc.server.cli import add_serve_arguments, run_serve

parser = argparse.ArgumentParser(prog="python -m keepsrc.server", description="keepsrc xDS server")
add_serve_arguments(parser)
raise SystemExit(run_serve(parser.parse_args()))
