"""Torchrun worker of tests/test_bounded_exit.py: writes its pid to NOTICE.pid, waits for the file GO (its launcher
may be killed meanwhile, as during a slow start), watches its launcher as scalematch.py does, writes NOTICE.watching,
and computes, as training would, until it is told that the launcher ended: then it writes NOTICE.

    python -m util.launcher 1 tests/launcher_watch_worker.py GO NOTICE
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from util.dist import watch_launcher  # noqa: E402  (the repository is on the path only now)

go, notice = sys.argv[1:3]
with open(f"{notice}.pid", "w") as file:
    file.write(str(os.getpid()))
while not os.path.exists(go):
    time.sleep(0.05)


watch_launcher(lambda: open(notice, "w").close())
open(f"{notice}.watching", "w").close()
product = torch.randn(256, 256)
deadline = time.time() + 120
while not os.path.exists(notice) and time.time() < deadline:
    product = (product @ product).tanh()
