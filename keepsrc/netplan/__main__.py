"""`python -m keepsrc.netplan`: the netplan command on its own, e.g. under `ip netns exec`."""

import argparse

from keepsrc.netplan.cli import add_netplan_arguments, run_netplan

parser = argparse.ArgumentParser(prog="keepsrc netplan")
add_netplan_arguments(parser)
raise SystemExit(run_netplan(parser.parse_args()))
