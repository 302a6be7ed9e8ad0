"""Defaults that fit the machine, from a fake /proc and /sys/fs/cgroup tree: the CPU quota of the process's
cgroup, the CPUs it may use and the decode workers (siglip_cli/config.py)."""

from __future__ import annotations

import os

import pytest

from siglip_cli import config
from siglip_cli.config import cgroup_cpu_limit, default_workers, usable_cpus


def test_cgroup_quota_caps_the_cpus(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/a/b\n")
    (tmp_path / "fs" / "a" / "b").mkdir(parents=True)
    (tmp_path / "fs" / "a" / "b" / "cpu.max").write_text("max 100000\n")
    (tmp_path / "fs" / "a" / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(str(proc), str(tmp_path / "fs")) == 1.5
    proc.write_text("4:cpu,cpuacct:/x\n")
    v1 = tmp_path / "fs" / "cpu,cpuacct"
    (v1 / "x").mkdir(parents=True)
    (v1 / "x" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "x" / "cpu.cfs_period_us").write_text("100000\n")
    (v1 / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(str(proc), str(tmp_path / "fs")) == 2.0
    proc.write_text("0::/\n")
    assert cgroup_cpu_limit(str(proc), str(tmp_path / "nothing")) is None


def test_the_smallest_quota_on_the_way_up_binds_and_other_controllers_do_not_count(tmp_path):
    """A slice's quota under a container's: the smaller one is the limit, whichever is the ancestor; a v1
    hierarchy without the cpu controller (memory) is not read as a CPU quota."""
    fs = tmp_path / "fs"
    (fs / "a" / "b").mkdir(parents=True)
    (fs / "a" / "b" / "cpu.max").write_text("50000 100000\n")
    (fs / "a" / "cpu.max").write_text("300000 100000\n")
    (fs / "cpu.max").write_text("max\n")  # no period written: the kernel's default
    proc = tmp_path / "cgroup"
    proc.write_text("0::/a/b\n")
    assert cgroup_cpu_limit(str(proc), str(fs)) == 0.5
    (fs / "a" / "b" / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(str(proc), str(fs)) == 3.0
    (fs / "memory" / "x").mkdir(parents=True)
    (fs / "memory" / "x" / "cpu.cfs_quota_us").write_text("100000\n")
    (fs / "memory" / "x" / "cpu.cfs_period_us").write_text("100000\n")
    proc.write_text("7:memory:/x\n")
    assert cgroup_cpu_limit(str(proc), str(fs)) is None


def test_no_cgroup_file_and_unreadable_quotas_are_no_limit(tmp_path):
    assert cgroup_cpu_limit(str(tmp_path / "no-such-proc-file"), str(tmp_path)) is None
    (tmp_path / "cpu.max").write_text("a lot\n")
    (tmp_path / "cgroup").write_text("0::/\n")
    assert cgroup_cpu_limit(str(tmp_path / "cgroup"), str(tmp_path)) is None


@pytest.mark.parametrize(
    "affinity, quota, cpus, workers",
    [
        (8, None, 8, 7),  # one CPU left to feed the device
        (8, 1.5, 2, 1),  # a fractional quota rounds up
        (4, 6.0, 4, 3),  # a quota above the affinity mask changes nothing
        (1, 0.25, 1, 1),  # never under one
        (64, None, 64, 16),  # at most 16 decode workers
    ],
)
def test_usable_cpus_are_the_affinity_mask_capped_by_the_quota(monkeypatch, affinity, quota, cpus, workers):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)
    monkeypatch.setattr(config, "cgroup_cpu_limit", lambda: quota)
    assert usable_cpus() == cpus
    assert default_workers() == workers
