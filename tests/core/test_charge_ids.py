"""Charge ids: unique per process and fresh in a forked worker (pure Python)."""

from __future__ import annotations

import os

import pytest

import meterkit.backends.charge_ids as plan_module


# Python 3.12+ warns about fork() in a process with threads; this child only writes.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_charge_ids_count_up_under_the_process_prefix_and_are_fresh_after_fork() -> None:
    """A charge id is the process prefix and a decimal counter; a forked child draws a
    new prefix, so sibling workers never share ids (and never block each other's
    refunds)."""
    first, second = plan_module.new_charge_id(), plan_module.new_charge_id()
    prefix = plan_module._CHARGE_PREFIX
    assert first.startswith(prefix)
    assert second.startswith(prefix)
    assert int(second[len(prefix) :]) == int(first[len(prefix) :]) + 1
    assert str(int(first[len(prefix) :])) == first[len(prefix) :]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its first id and leave at once
        os.write(write, plan_module.new_charge_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 100).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert child
    assert not child.startswith(prefix)
    assert child.endswith("1")
    assert len(child) == len(prefix) + 1
