"""``hpc-kernel batch``: notebooks over parameter sets as Slurm job arrays."""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

from . import batch as batches
from .batch import (
    COMPLETED,
    FINAL,
    PENDING,
    RUNNING,
    STATES,
    BatchRecord,
    BatchRequest,
    TaskStatus,
)
from .cli import (
    _profile_name,
    _progress,
    _say_workspace_note,
    _table,
    _workspace,
    add_resource_arguments,
    python_env_argument,
)
from .errors import BatchError
from .notebooks import load_parameter_file, parse_assignment, skip_iri_format_checker
from .profiles import KernelRequest

WATCH_SECONDS = 2.0
BAR_WIDTH = 30


def cmd_submit(args: argparse.Namespace) -> int:
    sets = load_parameter_file(Path(args.params)) if args.params else [{}]
    fixed = dict(parse_assignment(text) for text in args.param or [])
    clash = sorted(set(fixed) & {name for s in sets for name in s})
    if clash:
        raise BatchError(f"--param {clash[0]}: also set in {args.params}; set it in one place")
    profile = _profile_name(args)
    request = BatchRequest(
        notebooks=[Path(nb) for nb in args.notebooks],
        parameter_sets=[{**s, **fixed} for s in sets],
        out_dir=Path(args.out),
        profile=profile,
        kernel=KernelRequest(name="batch", time=args.time, cpus=args.cpus, mem=args.mem, partition=args.partition,
                             gpus=args.gpus, image=args.image, workspace=_workspace(args), workspace_rw=args.rw,
                             time_warning=args.time_warning, allow_hosts=tuple(args.allow_host or ()),
                             python_env=python_env_argument(args)),
        max_parallel=args.max_parallel,
        task_timeout=batches.parse_duration(args.timeout, "--timeout") if args.timeout else None,
        cell_timeout=batches.parse_duration(args.cell_timeout, "--cell-timeout") if args.cell_timeout else None,
        skip_done=args.skip_done,
        name=args.name,
    )
    batch, skipped = batches.submit(request)
    _say_workspace_note(args)
    if batch is None:
        _progress(f"all {skipped} tasks already have a completed result in {Path(args.out).resolve()}; nothing submitted")
        return 0
    submission = batch.submissions[-1]
    _progress(f"submitted batch {batch.name}: {len(submission.indices)} tasks as job array {submission.job_id}"
              + (f", at most {args.max_parallel} at once" if args.max_parallel else "")
              + (f" ({skipped} skipped: already done)" if skipped else ""))
    print(batch.name)
    if args.watch:
        return _watch(batch.name)
    return 0


def _bar(done: int, total: int) -> str:
    filled = BAR_WIDTH * done // total if total else BAR_WIDTH
    return "[" + "#" * filled + "-" * (BAR_WIDTH - filled) + f"] {done}/{total}"


def _progress_line(statuses: list[TaskStatus]) -> str:
    counts = batches.counts(statuses)
    done = sum(n for state, n in counts.items() if state in FINAL)
    return f"{_bar(done, len(statuses))}  " + "  ".join(f"{state} {n}" for state, n in counts.items())


def _summary(batch: BatchRecord, statuses: list[TaskStatus]) -> dict[str, Any]:
    return {
        "name": batch.name, "profile": batch.profile, "out_dir": batch.out_dir, "created": batch.created,
        "tasks": len(statuses), "counts": batches.counts(statuses),
        "done": all(s.state in FINAL for s in statuses),
        "job_ids": [s.job_id for s in batch.submissions],
    }


def cmd_status(args: argparse.Namespace) -> int:
    name = args.batch or batches.latest_batch()
    if args.watch:
        return _watch(name)
    batch, statuses = batches.view(name)
    if args.json:
        print(json.dumps(_summary(batch, statuses), indent=2))
        return 0
    jobs = ", ".join(s.job_id for s in batch.submissions)
    print(f"batch {batch.name}: {len(statuses)} tasks, profile {batch.profile}, job array {jobs}")
    print(f"output: {batch.out_dir}")
    print(_progress_line(statuses))
    return 0


def _watch(name: str) -> int:
    """Keep the progress line live until every task has ended; exit 0 only if all completed."""
    tty = sys.stdout.isatty()
    last = ""
    while True:
        _, statuses = batches.view(name)
        line = _progress_line(statuses)
        if line != last:
            if tty:
                print("\r\033[K" + line, end="", flush=True)
            else:
                print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)
            last = line
        if all(s.state in FINAL for s in statuses):
            if tty:
                print()
            return 0 if all(s.state == COMPLETED for s in statuses) else 1
        time.sleep(WATCH_SECONDS)


def _short(parameters: dict[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in parameters.items()) or "-"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


def cmd_results(args: argparse.Namespace) -> int:
    name = args.batch or batches.latest_batch()
    batch, statuses = batches.view(name)
    if args.state:
        statuses = [s for s in statuses if s.state in args.state]
    if args.json:
        print(json.dumps([{**s.record, "state": s.state, "attempt": s.attempt, "message": s.message,
                           "batch_task": s.task.index, "name": s.task.name, "notebook": s.task.notebook,
                           "parameters": s.task.parameters, "log": str(batches.batch_files(name).log(
                               s.array_job_id, s.task.index))} for s in statuses], indent=2))
        return 0
    if args.csv:
        rows = [batches.result_row(s) for s in statuses]
        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]) if rows else ["task"])
        writer.writeheader()
        writer.writerows(rows)
        return 0
    if not statuses:
        print("no tasks", file=sys.stderr)
        return 0
    rows = []
    for s in statuses:
        error = s.error
        said = f"{error.get('ename')}: {error.get('evalue', '')}" if error else s.message if s.state not in (
            PENDING, RUNNING, COMPLETED) else ""
        said = said.splitlines()[0] if said else ""
        rows.append([str(s.task.index), Path(s.task.notebook).name, _short(s.task.parameters), s.state,
                     _duration(s.duration), s.node or "-", said[:70] + ("..." if len(said) > 70 else "")])
    _table(["task", "notebook", "parameters", "state", "duration", "node", "error"], rows)
    if args.verbose:
        for s in statuses:
            if s.state in FINAL - {COMPLETED}:
                print(f"\n--- task {s.task.index} ({s.task.name}): {s.state}")
                if s.error.get("traceback"):
                    print(s.error["traceback"].rstrip())
                tail = batches.task_log(batch, s)
                if tail:
                    print(f"--- last lines of its log:\n{tail}")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    name = args.batch or batches.latest_batch()
    submission, again = batches.retry(name, args.max_parallel)
    if submission is None:
        _progress(f"batch {name}: nothing to retry (no task failed, timed out, was cancelled or lost)")
        return 0
    by_state: dict[str, int] = {}
    for s in again:
        by_state[s.state] = by_state.get(s.state, 0) + 1
    _progress(f"batch {name}: resubmitted {len(again)} tasks ("
              + ", ".join(f"{n} {state}" for state, n in by_state.items()) + f") as job array {submission.job_id}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    name = args.batch or batches.latest_batch()
    statuses, ended = batches.cancel_batch(name)
    if not ended:
        _progress(f"batch {name}: cancelled, but Slurm has not ended every task after "
                  f"{batches.CANCEL_WAIT_SECONDS:.0f} s: {_progress_line(statuses)}; see `batch status {name}`")
        return 1
    _progress(f"batch {name} cancelled: {_progress_line(statuses)}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    rows = []
    for batch in batches.list_batches():
        try:
            _, statuses = batches.view(batch.name)
            counts = batches.counts(statuses)
            progress = " ".join(f"{state}={n}" for state, n in counts.items())
            tasks = str(len(statuses))
        except BatchError as e:
            progress, tasks = f"({e})", "?"
        rows.append([batch.name, batch.created, batch.profile, tasks, progress, batch.out_dir])
    if not rows:
        print("no batches", file=sys.stderr)
        return 0
    _table(["name", "created", "profile", "tasks", "states", "output"], rows)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    batch, statuses = batches.view(args.batch)
    found = [s for s in statuses if s.task.index == args.task]
    if not found:
        raise BatchError(f"batch {args.batch} has no task {args.task}"
                         + (f" (tasks 0-{len(statuses) - 1})" if statuses else ""))
    path = batches.batch_files(batch.name).log(found[0].array_job_id, args.task)
    try:
        sys.stdout.write(path.read_text(errors="replace"))
    except FileNotFoundError:
        print(f"no log yet: {path}", file=sys.stderr)
    return 0


def add_batch_parser(sub: Any) -> None:
    skip_iri_format_checker()
    p = sub.add_parser("batch", help="run notebooks over parameter sets as Slurm job arrays")
    commands = p.add_subparsers(dest="batch_command", required=True, metavar="SUBCOMMAND")

    q = commands.add_parser("submit", help="one job array: every notebook with every parameter set")
    q.add_argument("notebooks", nargs="+", metavar="NOTEBOOK")
    q.add_argument("--out", "-o", required=True, help="where executed notebooks and result records go "
                   "(on a file system the compute nodes share)")
    q.add_argument("--params", metavar="FILE", help="YAML: grid: (every combination), list: of sets, fixed:")
    q.add_argument("--param", action="append", metavar="NAME=VALUE", help="a parameter for every task "
                   "(repeatable; VALUE read as YAML)")
    q.add_argument("--profile", help="site profile (default: $HPC_KERNELS_PROFILE, or 'default')")
    q.add_argument("--name", "-n", help="the batch's name (default: the first notebook's stem and a number)")
    q.add_argument("--max-parallel", "-m", type=int, help="run at most this many tasks at once (sbatch --array %%M)")
    q.add_argument("--timeout", help="a task's whole time limit, e.g. 10m, 1h30m, 90s (it is then TIMEOUT)")
    q.add_argument("--cell-timeout", help="one cell's time limit (nbclient's timeout)")
    q.add_argument("--skip-done", action="store_true", help="leave out tasks with a completed result in --out")
    q.add_argument("--watch", action="store_true", help="then follow its progress until it ends")
    add_resource_arguments(q)
    q.set_defaults(func=cmd_submit)

    q = commands.add_parser("status", help="counts by state and a progress bar")
    q.add_argument("batch", nargs="?", help="(default: your latest batch)")
    q.add_argument("--watch", action="store_true", help="keep it live until every task has ended "
                   "(exit 1 if any did not complete)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_status)

    q = commands.add_parser("results", help="one row per task: inputs, state, duration, node, error")
    q.add_argument("batch", nargs="?", help="(default: your latest batch)")
    form = q.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="every task's full result record")
    form.add_argument("--csv", action="store_true")
    q.add_argument("--state", action="append", choices=STATES, help="only tasks in this state (repeatable)")
    q.add_argument("--verbose", "-v", action="store_true", help="with the traceback and log of each failed task")
    q.set_defaults(func=cmd_results)

    q = commands.add_parser("retry", help="resubmit only the failed, timed-out, cancelled or lost tasks")
    q.add_argument("batch", nargs="?", help="(default: your latest batch)")
    q.add_argument("--max-parallel", "-m", type=int, help="(default: as before)")
    q.set_defaults(func=cmd_retry)

    q = commands.add_parser("cancel", help="cancel every task that has not ended")
    q.add_argument("batch", nargs="?", help="(default: your latest batch)")
    q.set_defaults(func=cmd_cancel)

    q = commands.add_parser("list", help="your batches")
    q.set_defaults(func=cmd_list)

    q = commands.add_parser("logs", help="one task's Slurm log")
    q.add_argument("batch")
    q.add_argument("task", type=int)
    q.set_defaults(func=cmd_logs)
