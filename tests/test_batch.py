"""The pure parts of batches: tasks, array specs, durations, and how a task's state is judged
from its result record and Slurm's view (no cluster needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpc_kernels.batch import (
    CANCELLED,
    COMPLETED,
    FAILED,
    LOST,
    NODE_FAIL,
    PENDING,
    RUNNING,
    TIMEOUT,
    BatchRecord,
    Submission,
    _create_batch_dir,
    may_settle,
    parse_duration,
    plan_tasks,
    slurm_time,
    task_state,
)
from hpc_kernels.errors import BatchError
from hpc_kernels.slurm import ArrayTaskInfo, array_spec, parse_array_tasks


def test_every_notebook_meets_every_parameter_set() -> None:
    tasks = plan_tasks([Path("/w/a.ipynb"), Path("/w/b.ipynb")], [{"x": 1}, {"x": 2}])
    assert [(t.index, Path(t.notebook).name, t.parameters, t.name) for t in tasks] == [
        (0, "a.ipynb", {"x": 1}, "a_x=1"), (1, "a.ipynb", {"x": 2}, "a_x=2"),
        (2, "b.ipynb", {"x": 1}, "b_x=1"), (3, "b.ipynb", {"x": 2}, "b_x=2")]
    assert tasks[0].output("/out") == Path("/out/a_x=1.ipynb")
    assert tasks[0].failed_output("/out") == Path("/out/a_x=1.failed.ipynb")
    assert tasks[0].result("/out") == Path("/out/a_x=1.result.json")


def test_a_notebook_named_twice_runs_once_and_a_repeated_set_is_refused() -> None:
    assert len(plan_tasks([Path("/w/a.ipynb"), Path("/w/./a.ipynb")], [{}])) == 1
    with pytest.raises(BatchError, match=r'parameter set 3 \({"x": 1}\) is the same as set 1'):
        plan_tasks([Path("/w/a.ipynb")], [{"x": 1}, {"x": 2}, {"x": 1}])
    assert len(plan_tasks([Path("/w/a.ipynb")], [{"x": 1}, {"x": True}, {"x": 1.0}])) == 3  # 1 == True in Python


def test_batch_names_are_usable_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPC_KERNELS_PATHS_STATE", str(tmp_path / "state"))
    assert _create_batch_dir(None, "_draft").dir.name == "draft-1"
    assert _create_batch_dir(None, "_draft").dir.name == "draft-2"
    assert _create_batch_dir(None, "...").dir.name == "batch-1"
    with pytest.raises(BatchError, match="--name '-x': expected 1-40 letters"):
        _create_batch_dir("-x", "nb")


def test_slurms_word_never_replaces_another_batchs_record_or_a_newer_attempt() -> None:
    assert may_settle(None, "b", ["10"])
    assert may_settle({"batch": "b", "array_job_id": "10", "state": RUNNING}, "b", ["10", "20"])
    assert not may_settle({"batch": "other", "array_job_id": "30", "state": COMPLETED}, "b", ["10"])
    assert not may_settle({"batch": "b", "array_job_id": "20", "state": RUNNING}, "b", ["10"])  # a retry since


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90), ("90s", 90), ("10m", 600), ("1h30m", 5400), ("2d", 172800), ("1:30:00", 5400), ("10:00", 600),
    ("0.5s", 0.5),
])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text, "--timeout") == seconds


@pytest.mark.parametrize("text", ["", "0", "ten", "5x", "-3m", "1:2:3:4"])
def test_bad_durations_say_what_is_expected(text: str) -> None:
    with pytest.raises(BatchError, match="--timeout .*expected a duration such as 90s"):
        parse_duration(text, "--timeout")


def test_slurm_time_rounds_up_to_whole_minutes() -> None:
    assert slurm_time(60) == "0-00:01:00"
    assert slurm_time(61) == "0-00:02:00"
    assert slurm_time(600 + 300) == "0-00:15:00"
    assert slurm_time(2 * 86400 + 3600) == "2-01:00:00"


def test_array_spec_folds_ranges() -> None:
    assert array_spec(range(9), 4) == "0-8%4"
    assert array_spec([13, 0, 1, 2, 11, 14]) == "0-2,11,13-14"
    assert array_spec([5]) == "5"
    with pytest.raises(ValueError):
        array_spec([])


def test_squeue_array_lines_are_parsed() -> None:
    out = ("1132|2|1132|PENDING|JobArrayTaskLimit||N/A|N/A\n"
           "1132|0|1133|RUNNING|None|c1|2026-11-23T23:19:40|NONE\n"
           "1132|4-8%2|1132|PENDING|JobArrayTaskLimit||N/A|N/A\n"
           "1140|3|1144|NODE_FAIL|NodeDown|c2|2026-11-23T23:19:44|2026-11-23T23:19:47\n")
    tasks = parse_array_tasks(out)
    assert set(tasks) == {("1132", 2), ("1132", 0), ("1140", 3)}
    assert tasks[("1132", 2)].node is None and tasks[("1132", 2)].reason == "JobArrayTaskLimit"
    assert tasks[("1132", 0)].job_id == "1133" and tasks[("1132", 0)].start == "2026-11-23T23:19:40"
    assert tasks[("1132", 0)].end is None and not tasks[("1132", 0)].finished
    assert tasks[("1140", 3)].finished and tasks[("1140", 3)].end == "2026-11-23T23:19:47"


def test_a_task_belongs_to_its_latest_submission() -> None:
    batch = BatchRecord(name="b", profile="local", out_dir="/out", created="now", submissions=[
        Submission("10", [0, 1, 2], "job-1.sh", "t1"), Submission("20", [1], "job-2.sh", "t2")])
    assert batch.current(0) == (batch.submissions[0], 1)
    assert batch.current(1) == (batch.submissions[1], 2)
    assert batch.current(7) is None


TASK = plan_tasks([Path("/w/a.ipynb")], [{"x": 1}])[0]


def element(state: str, node: str | None = "c1") -> ArrayTaskInfo:
    return ArrayTaskInfo("20", TASK.index, "21", state, "", node, "2026-01-01T00:00:00", "2026-01-01T00:01:00")


def judge(record: dict | None, slurm: ArrayTaskInfo | None, cancelled: bool = False):
    return task_state(TASK, "20", 2, record, slurm, cancelled)


def test_pending_and_running_come_from_slurm() -> None:
    assert judge(None, element("PENDING", None)).state == PENDING
    assert judge({"array_job_id": "20", "state": RUNNING}, element("RUNNING")).state == RUNNING
    assert judge(None, element("COMPLETING")).state == RUNNING


def test_a_final_record_of_this_attempt_decides() -> None:
    record = {"array_job_id": "20", "state": FAILED, "message": "ValueError: x", "error": {"ename": "ValueError"}}
    status = judge(record, element("FAILED"))
    assert status.state == FAILED and status.error == {"ename": "ValueError"} and status.settled is None
    assert judge({**record, "state": COMPLETED}, None).state == COMPLETED  # Slurm forgot it: the record stays


def test_a_record_of_an_earlier_attempt_is_ignored() -> None:
    old = {"array_job_id": "10", "state": FAILED}
    assert judge(old, element("PENDING", None)).state == PENDING
    assert judge(old, element("RUNNING")).state == RUNNING


@pytest.mark.parametrize(("slurm_state", "expected"), [
    ("TIMEOUT", TIMEOUT), ("NODE_FAIL", NODE_FAIL), ("CANCELLED", CANCELLED), ("FAILED", FAILED),
    ("OUT_OF_MEMORY", "OUT_OF_MEMORY"), ("PREEMPTED", CANCELLED),
])
def test_a_task_that_ended_without_a_final_result_takes_slurms_word(slurm_state: str, expected: str) -> None:
    running = {"array_job_id": "20", "state": RUNNING, "start": "2026-01-01T00:00:05Z"}
    status = judge(running, element(slurm_state))
    assert status.state == expected
    assert status.settled is not None and status.settled["state"] == expected
    assert status.settled["start"] == "2026-01-01T00:00:05Z" and status.settled["end"] == "2026-01-01T00:01:00Z"
    assert status.settled["node"] == "c1" and status.settled["attempt"] == 2 and f"Slurm: {slurm_state}" in status.message
    assert judge(None, element(slurm_state)).state == expected  # it never started


def test_a_completed_task_whose_record_went_missing_is_completed_and_not_written_back() -> None:
    status = judge({"array_job_id": "20", "state": RUNNING}, element("COMPLETED"))
    assert status.state == COMPLETED and "result record is missing" in status.message and status.settled is None


def test_a_task_stopped_by_a_signal_learns_why_from_slurm() -> None:
    stopped = {"array_job_id": "20", "state": CANCELLED, "signal": "SIGTERM", "message": "stopped by SIGTERM"}
    assert judge(stopped, element("TIMEOUT")).state == TIMEOUT
    assert judge(stopped, element("TIMEOUT")).settled["state"] == TIMEOUT
    assert judge(stopped, element("CANCELLED")).state == CANCELLED
    assert judge(stopped, element("CANCELLED")).settled is None
    assert judge(stopped, None).state == CANCELLED


def test_a_task_slurm_forgot_without_a_result_is_lost_or_cancelled() -> None:
    assert judge({"array_job_id": "20", "state": RUNNING}, None).state == LOST
    assert judge(None, None).state == LOST
    assert judge(None, None, cancelled=True).state == CANCELLED
