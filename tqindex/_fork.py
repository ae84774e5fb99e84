"""A child forked from a process that runs threads keeps torch on one thread.

GNU OpenMP, torch's thread runtime on Linux, hangs in a child forked after the parent used its
threads: the child's first threaded torch operation (a search's query rotation, the index's own
``add``) waits for workers that exist only in the parent. As torch's DataLoader does for its
workers, such a child sets ``torch.set_num_threads(1)`` as it starts; a process that ran no
thread when it forked (a forkserver, say) leaves its children as they are. The fast-scan's
threads are a pool of their own in a forked child (``kernels/fastscan.py``).
"""

from __future__ import annotations

import os

import torch

_TASKS = "/proc/self/task"  # the process's threads (Linux, the one platform whose torch uses GNU OpenMP)
_threaded_at_fork = False


def _before_fork() -> None:
    global _threaded_at_fork
    _threaded_at_fork = len(os.listdir(_TASKS)) > 1


def _in_child() -> None:
    if _threaded_at_fork and torch.get_num_threads() > 1:
        torch.set_num_threads(1)


if os.path.isdir(_TASKS):
    os.register_at_fork(before=_before_fork, after_in_child=_in_child)
