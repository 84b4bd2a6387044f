import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

pytest_plugins = ["tests.peers.fixtures"]

if os.environ.get("HOSTWALL_FD_AUDIT"):
    pytest_plugins.append("tests.fdaudit")
