"""A RunningHub simulator: a real HTTP server speaking RunningHub's documented API,
with fault injection and counters. Tests start it in-process with `running_sim`;
`make up` runs it as `python -m tools.runninghub_sim`. See README.md beside this file.
"""

from tools.runninghub_sim.config import SimConfig
from tools.runninghub_sim.fixtures import DEV_KEYS, WEBAPPS
from tools.runninghub_sim.server import RunningSim, running_sim, start
from tools.runninghub_sim.simulator import Simulator
from tools.runninghub_sim.tasks import key_id

__all__ = ["DEV_KEYS", "WEBAPPS", "RunningSim", "SimConfig", "Simulator", "key_id", "running_sim", "start"]
