"""Parsing what Slurm's command-line tools print (pure functions)."""

from __future__ import annotations

import pytest

from hpc_kernels.errors import SlurmError
from hpc_kernels.slurm import job_info_from_fields, parse_sbatch_parsable, parse_scontrol_oneliner, srun_into_job

# A real line from `scontrol show job -o` on the test cluster (Slurm 22.05), shortened.
LINE = ("JobId=21 JobName=hk-demo UserId=hk-alice(1001) GroupId=hk-alice(1001) Priority=1 "
        "JobState=PENDING Reason=ReqNodeNotAvail,_UnavailableNodes:c2 Dependency=(null) "
        "ExitCode=0:0 NodeList=(null) BatchHost=(null) Command=(null) "
        "WorkDir=/home/hk-alice/my dir StdOut=/home/hk-alice/.local/share/hpc-kernels/kernels/demo/job.log "
        "TRES=cpu=1,mem=1G,node=1,billing=1")


def test_scontrol_line_with_spaces_in_values() -> None:
    fields = parse_scontrol_oneliner(LINE)
    assert fields["JobId"] == "21"
    assert fields["WorkDir"] == "/home/hk-alice/my dir"
    assert fields["TRES"] == "cpu=1,mem=1G,node=1,billing=1"
    info = job_info_from_fields(fields)
    assert info.state == "PENDING" and not info.running and not info.finished
    assert info.reason == "ReqNodeNotAvail,_UnavailableNodes:c2"
    assert info.node is None


def test_running_job_has_its_node() -> None:
    info = job_info_from_fields(parse_scontrol_oneliner("JobId=3 JobState=RUNNING Reason=None NodeList=c1 BatchHost=c1"))
    assert info.running and info.node == "c1" and info.reason == ""


@pytest.mark.parametrize("state", ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"])
def test_finished_states(state: str) -> None:
    assert job_info_from_fields({"JobState": state}).finished


@pytest.mark.parametrize("out, job", [("42\n", "42"), ("42;cluster\n", "42"), ("warning\n43\n", "43")])
def test_sbatch_parsable(out: str, job: str) -> None:
    assert parse_sbatch_parsable(out) == job


def test_sbatch_without_job_id() -> None:
    with pytest.raises(SlurmError):
        parse_sbatch_parsable("")


def test_srun_into_job_overlaps_and_is_unbuffered() -> None:
    argv = srun_into_job("9", ["python", "-m", "x"])
    assert argv[:4] == ["srun", "--jobid=9", "--overlap", "-u"]
    assert argv[-3:] == ["python", "-m", "x"]


def test_srun_into_job_can_limit_the_exported_environment() -> None:
    argv = srun_into_job("9", ["x"], export=["PATH", "HOME"])
    assert "--export=PATH,HOME" in argv and argv[-1] == "x"


def test_a_reused_job_id_is_not_our_job() -> None:
    from hpc_kernels.launcher import _same_job
    from hpc_kernels.state import KernelRecord

    record = KernelRecord(name="k", profile="local", status="submitted", job_id="7",
                          submit_time="2026-11-23T10:00:00")
    ours = job_info_from_fields({"JobId": "7", "JobState": "RUNNING", "SubmitTime": "2026-11-23T10:00:00"})
    reused = job_info_from_fields({"JobId": "7", "JobState": "RUNNING", "SubmitTime": "2026-11-24T09:00:00"})
    assert _same_job(record, ours) is ours
    assert _same_job(record, reused) is None


def test_a_requeued_job_is_still_ours_and_its_old_reports_are_not_believed() -> None:
    """Slurm resets SubmitTime when it requeues a job; the name says it is still ours. The
    agent.json of the kernel that ran before the requeue says nothing of the new one."""
    from hpc_kernels.launcher import KernelView, _same_job
    from hpc_kernels.state import KernelRecord

    record = KernelRecord(name="k", profile="local", status="ready", job_id="7", submit_time="2026-11-23T10:00:00")
    requeued = job_info_from_fields({"JobId": "7", "JobState": "RUNNING", "SubmitTime": "2026-11-23T11:00:00",
                                     "JobName": "hk-k"})
    assert _same_job(record, requeued) is requeued
    before = KernelView(record, requeued, {"state": "ready", "node": "c1"}, {})
    assert before.requeued and before.agent_state == "" and before.state == "starting"
    after = KernelView(record, requeued, {"state": "ready", "node": "c2", "restarts": 1,
                                          "submit_time": "2026-11-23T11:00:00"}, {})
    assert after.requeued and after.state == "ready"
    first = job_info_from_fields({"JobId": "7", "JobState": "RUNNING", "SubmitTime": "2026-11-23T10:00:00",
                                  "JobName": "hk-k"})
    assert not KernelView(record, first, {"state": "ready"}, {}).requeued


def test_expected_start_of_a_pending_job() -> None:
    pending = job_info_from_fields({"JobState": "PENDING", "StartTime": "2026-11-23T21:00:00"})
    assert pending.expected_start == "2026-11-23 21:00:00 UTC"
    assert job_info_from_fields({"JobState": "PENDING", "StartTime": "Unknown"}).expected_start is None
    assert job_info_from_fields({"JobState": "RUNNING", "StartTime": "2026-11-23T21:00:00"}).expected_start is None


def test_squeue_lines_become_job_infos() -> None:
    from hpc_kernels.slurm import parse_squeue_jobs

    out = ("12|RUNNING|None|c1|c1|2026-11-23T19:00:00|2026-11-23T19:00:01|hk-a\n"
           "13|PENDING|Resources||n/a|2026-11-23T19:00:02|2026-11-23T20:00:00|hk-b\n"
           "garbage line\n")
    infos = parse_squeue_jobs(out)
    assert set(infos) == {"12", "13"}
    assert infos["12"].running and infos["12"].node == "c1" and infos["12"].submit_time == "2026-11-23T19:00:00"
    assert infos["13"].reason == "Resources" and infos["13"].node is None and infos["13"].name == "hk-b"
    assert infos["13"].expected_start == "2026-11-23 20:00:00 UTC"
