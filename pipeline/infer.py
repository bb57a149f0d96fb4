"""A whole inference run: check, plan the shards, bind the run folder, run what is not done, account.

    summary = run_infer(job, dask_executor)

Executor-agnostic: `executor_factory(cluster_cfg)` is a context manager giving an Executor
(`map_unordered`, `on_each_worker`, `threads`: the protocol in pipeline/executors).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from .batch_api import is_requests_file, parquet_copy, write_responses
from .candidates import check_candidates
from .catalogue import embed_texts
from .catalogue import resolve as resolve_catalogue
from .checks import check_job, check_output_place, check_requests
from .config import JobConfig
from .counts import Counts
from .dedupe import find_duplicates, pending_hashes, written_hashes
from .errors import InputError, ModelError, RunStateError, Stopped
from .fingerprint import fingerprint, keep_folder_schema
from .inputs import resolve_inputs
from .ledger import Plan, complete_records, extend, read_ledger, remove_withdrawn
from .manifest import RunDir, atomic_write_bytes, atomic_write_json
from .plan import Shard
from .prestart import Prestarted
from .runner import ShardResult, is_complete, run_shard, warm, write_error

if TYPE_CHECKING:
    from .executors import ExecutorFactory


class Stop:
    """How hard a run has been asked to stop: 0 go on, 1 drain (no new shards), 2 abandon.

    Signal handlers raise the level; the executor reads it between completions.
    """

    def __init__(self) -> None:
        self.level = 0
        self.signal: int | None = None

    def request(self, signum: int | None = None) -> None:
        self.level = min(2, self.level + 1)
        self.signal = self.signal or signum


@dataclass
class RunSummary:
    output: str
    shards_total: int = 0
    shards_skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    """shard id or 'file <key>' -> reason, for what could not be processed."""
    notes: list[str] = field(default_factory=list)
    """What the user should know that is not a failure (e.g. results withdrawn for a changed file)."""
    totals: Counts = field(default_factory=Counts)
    """Over the complete shards of this run's inputs, whichever run completed them."""
    processed: Counts = field(default_factory=Counts)
    """What this run itself processed."""
    seconds: float = 0.0
    startup: dict[str, float] = field(default_factory=dict)
    """Where the time went before the first batch entered the model (see `_Run.go`)."""
    dashboard: str | None = None
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted and self.totals.shards == self.shards_total


def owns(shard_id: str, share: tuple[int, int]) -> bool:
    """Whether array task `share[0]` of `share[1]` runs this shard: a function of the id alone,
    so tasks that see the plan at different moments still give each shard exactly one owner."""
    return zlib.crc32(shard_id.encode()) % share[1] == share[0]


def run_infer(
    job: JobConfig,
    executor_factory: ExecutorFactory,
    on_shard: Callable[[ShardResult, RunSummary], None] | None = None,
    on_start: Callable[[RunSummary, int], None] | None = None,
    stop: Stop | None = None,
    share: tuple[int, int] = (0, 1),
    launcher: dict | None = None,
    nested: Callable[[JobConfig], RunSummary] | None = None,
    started: float | None = None,
) -> RunSummary:
    """Run every shard of `job` that is not complete; return the run's totals.

    `share=(k, n)`: this process runs the shards it owns (array tasks splitting one run folder;
    each shard has one owner, so each row is written once); duplicates are judged over every
    pending shard, whoever owns it. `launcher`: facts about what started the run (e.g. a Slurm job
    id), kept in the run's entry. `nested(job)` runs a job this one needs first (recommend: the
    embedding of a text catalogue) to its end; default: run_infer with the same executors.
    `started`: when the command started (epoch seconds; default: now), the origin of the run's
    start-up figures and seconds.

    `on_start(summary, pending)` is called once the cluster is up (and again if shards are
    re-planned mid-run), `on_shard(result, summary)` after each shard, for progress display.
    Raising `stop.level` drains or abandons the run; what is complete stays complete and a rerun
    does the rest.
    """
    t0 = time.time()
    started = t0 if started is None else min(started, t0)
    stop = stop or Stop()
    summary = RunSummary(output=str(job.output.path))
    check_job(job)  # on the client, before any worker starts
    try:
        files = resolve_inputs(job.input.paths, should_stop=lambda: stop.level > 0)
    except Stopped:
        summary.interrupted = True
        return summary
    job = as_requests_job(job, files)
    check_output_place(job, files)
    if job.task.name == "recommend":  # the catalogue checked (a text one is embedded below)
        job = resolve_catalogue(job, share)
    if job.task.candidates:  # rerank a recommend run's items
        check_candidates(job.task)
    run = RunDir.at(job.output.path)
    try:
        bound = run.read_run() if run.root.is_dir() else None
    except OSError as e:
        raise RunStateError(write_error(e, run)) from None
    job = keep_folder_schema(job, bound)
    fp = fingerprint(job)
    early: Prestarted | None = None
    try:
        run.bind(fp, job.output.overwrite)
        if job.cluster.executor != "serial" and job.task.name != "recommend":
            # the workers start while this client plans (not for recommend, whose text catalogue
            # may first be embedded by a run of its own); they load the model once the plan
            # says a shard is pending (a model load cut short by the run's end would leave a
            # worker's traceback on the user's screen)
            early = Prestarted(executor_factory, job.cluster)
        with run.lock():
            if job.task.name == "recommend":  # a text catalogue: its vectors first
                try:
                    job = embed_texts(
                        job, nested or (lambda j: run_infer(j, executor_factory, stop=stop))
                    )
                except Stopped:
                    summary.interrupted = True
                    return summary
            if job.task.requests:  # each request file is read through its Parquet copy
                files = {k: parquet_copy(k, run.root / "_inputs") for k in files}
            return _Run(job, run, fp["sha"], files, stop, share, summary, early).go(
                early.use if early is not None else executor_factory,
                on_shard,
                on_start,
                launcher or {},
                t0,
                started,
            )
    except OSError as e:  # the folder itself: read-only, full, not a folder
        raise RunStateError(write_error(e, run)) from None
    finally:
        if early is not None:
            early.close()  # the workers end (and the run's seconds include their ending)
            summary.seconds = time.time() - started


def as_requests_job(job: JobConfig, files: dict[str, str]) -> JobConfig:
    """The job as it reads Batch-API request files (.jsonl inputs), or unchanged."""
    from dataclasses import replace

    requests = [k for k in files if is_requests_file(k)]
    if not requests:
        return job
    if len(requests) != len(files):
        raise InputError(
            f"the inputs mix Batch-API request files ({requests[0]}) and Parquet files "
            f"({next(k for k in files if not is_requests_file(k))}); run them separately"
        )
    job = replace(
        job,
        input=replace(job.input, text_column="text", id_column="id"),
        task=replace(job.task, requests=True),
    )
    check_requests(job)
    return job


class _Run:
    """One run's state between planning and accounting."""

    def __init__(
        self, job, run: RunDir, sha: str, files, stop: Stop, share, summary: RunSummary, early=None
    ):
        self.job, self.run, self.sha, self.files = job, run, sha, files
        self.early: Prestarted | None = early
        self.stop, self.share, self.summary = stop, share, summary
        self.token = uuid.uuid4().hex[
            :8
        ]  # task keys unique to this run, even on a shared scheduler
        self.fatal: str | None = None  # a model that cannot load: the run ends with it
        self.first_model = 0.0  # when the first shard's first batch went into the model
        self.first_load = 0.0  # and the seconds that shard spent loading the model

    def plan(self, **kw) -> Plan:
        cfg = self.job.input
        columns = self.job.task.input_columns()
        plan = extend(
            self.run,
            self.files,
            cfg.text_column,
            cfg.shard_rows,
            task_columns=columns,
            text_kind=cfg.text_kind,
            **kw,
        )
        for key, why in plan.problems.items():
            self.summary.failed[f"file {key}"] = why
        for sid, why in plan.retracted.items():
            self.summary.notes.append(f"withdrew shard {sid}: {why}")
        for key, why in plan.dropped.items():
            self.summary.notes.append(f"file {key}: {why}")
        return plan

    def go(
        self, executor_factory, on_shard, on_start, launcher: dict, t0: float, started: float
    ) -> RunSummary:
        run, summary, stop = self.run, self.summary, self.stop
        stamp = time.strftime("%Y-%m-%dT%H%M%S", time.localtime(t0))
        entry_path = run.runs_dir / f"{stamp}-{os.getpid()}-{self.token}.json"
        entry = {
            "started": t0,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "share": list(self.share),
            "task": self.job.task.name,
            **launcher,
        }
        atomic_write_json(entry_path, entry)  # a run that dies still leaves its start
        run.remove_stale_temporaries()
        plan = self.plan()
        t_planned = time.time()
        pending = [s for s in plan.shards if not is_complete(run, s.id, self.sha)]
        mine = [s for s in pending if owns(s.id, self.share)]
        summary.shards_total = len(plan.shards)
        summary.shards_skipped = len(plan.shards) - len(pending)
        entry["shards_pending"] = len(mine)
        if mine:  # the folder is about to change: what describes it whole goes until it is
            run.success.unlink(missing_ok=True)
            for name in ("results.jsonl", "errors.jsonl"):
                (run.root / "_batch" / name).unlink(missing_ok=True)

        with executor_factory(self.job.cluster) as ex:
            early = self.early
            t_cluster = early.ready_at if early is not None else time.time()
            summary.dashboard = getattr(ex, "dashboard_link", None)
            if mine:
                warming = ex.on_each_worker(
                    warm,
                    f"warm-{self.token}",
                    job=self.job,
                    threads=ex.threads,
                    fingerprint_sha=self.sha,
                )
            else:
                warming = []
            if on_start:
                on_start(summary, len(mine))
            if mine and not stop.level:
                split = self.run_round(ex, plan, pending, mine, on_shard)
                if split and not stop.level:
                    plan = self.replan_split(ex, plan, split, on_shard, on_start)
            loads = [f.result() for f in warming if f.done() and f.status == "finished"]
            del warming  # loaded or not, the shards are done with
        summary.startup = {  # seconds from the command's start
            "config": t0 - started,  # interpreter, imports, the config and its checks
            "planned": t_planned - started,  # inputs listed, model hashed, folder bound, planned
        }
        if self.job.cluster.executor != "serial":  # the executor up (workers started or joined)
            summary.startup["cluster"] = t_cluster - started
        if any(s >= 0 for s in loads):  # on the workers, beside the client's own steps
            summary.startup["load"] = max(loads)
        elif self.first_load:  # no head start: the first shard loaded it
            summary.startup["load"] = self.first_load
        if self.first_model:
            summary.startup["first_batch"] = self.first_model - started
        summary.interrupted = stop.level > 0 and not self.fatal
        if self.fatal:
            summary.failed["model"] = self.fatal
        self.account(plan)
        summary.seconds = time.time() - started
        entry.update(
            finished=time.time(),
            processed=summary.processed.as_dict(),
            failed=summary.failed,
            notes=summary.notes,
            interrupted=summary.interrupted,
            complete=summary.ok,
            totals=summary.totals.as_dict(),
            shards_total=summary.shards_total,
            startup=summary.startup,
        )
        try:
            whole = summary.ok and self.consistent()
            if summary.ok and not whole:
                summary.notes.append(
                    "this run's inputs are done, but not every shard of the folder is (files "
                    "no input named this time): no _SUCCESS until a run completes them"
                )
            entry["notes"] = summary.notes
            atomic_write_json(entry_path, entry)
            if whole and self.job.output.format == "batch-jsonl":
                done = complete_records(run, self.sha)
                model = os.path.basename(os.path.normpath(self.job.model.path))
                written, errors = write_responses(run, done, model)
                summary.notes.append(
                    f"Batch-API responses: {written} in {run.root / '_batch' / 'results.jsonl'}, "
                    f"{errors} in {run.root / '_batch' / 'errors.jsonl'}"
                )
            if whole:
                atomic_write_bytes(run.success, b"")
            else:  # e.g. a bad file named by this run: the folder is not all done
                run.success.unlink(missing_ok=True)
        except OSError as e:
            raise RunStateError(write_error(e, run)) from None
        if self.fatal:
            raise ModelError(self.fatal)
        return summary

    def run_round(self, ex, plan: Plan, pending, mine, on_shard) -> dict[str, dict[str, str]]:
        """Run `mine`, judging duplicates over `pending`; return the failed shards of more than
        one file that failed for some of their files' sake ({shard id: {key: why}})."""
        duplicates = self.duplicates(ex, plan, pending)
        split: dict[str, dict[str, str]] = {}
        for shard, res in ex.map_unordered(
            run_shard,
            mine,
            key=lambda s: f"shard-{s.id}-{self.token}",
            stop=self.stop,
            job=self.job,
            fingerprint_sha=self.sha,
            threads=ex.threads,
            per_item={"duplicates": lambda s: duplicates.get(s.id, {})},
        ):
            if isinstance(res, BaseException):
                if not self.stop.level:
                    self.summary.failed[shard.id] = f"{shard.sources}: {type(res).__name__}: {res}"
                continue
            if res.error and res.fatal:  # the model, not this shard: every shard would fail
                self.fatal = res.error
                self.stop.level = 2  # abandon the rest at once
                continue
            if res.error:
                if res.bad_files and set(shard.keys) - set(res.bad_files):
                    split[shard.id] = res.bad_files
                else:
                    self.summary.failed[shard.id] = res.error
            else:
                self.summary.processed += Counts.of(asdict(res))
                if res.model_started and (
                    not self.first_model or res.model_started < self.first_model
                ):
                    self.first_model = res.model_started
                    self.first_load = res.seconds.get("load", 0.0)
            if on_shard:
                on_shard(res, self.summary)
        return split

    def replan_split(self, ex, plan: Plan, split, on_shard, on_start) -> Plan:
        """Withdraw shards that failed for some files' sake, pack their other files again and
        (unless other array tasks are running beside this one) run those at once."""
        bad = {k: why for b in split.values() for k, why in b.items()}
        retract = {sid: f"files {', '.join(b)} of it could not be read" for sid, b in split.items()}
        before = {s.id for s in plan.ledger.live}
        plan = self.plan(retract=retract, alone=frozenset(bad))
        for key, why in bad.items():
            self.summary.failed[f"file {key}"] = why
        if self.share != (0, 1):  # the others judged duplicates without the new shards: next run
            return plan
        fresh = [
            s
            for s in plan.shards
            if s.id not in before
            and not set(s.keys) <= set(bad)
            and not is_complete(self.run, s.id, self.sha)
        ]
        self.summary.shards_total = len(plan.shards)
        if fresh:
            if on_start:
                on_start(self.summary, len(fresh))
            again = self.run_round(ex, plan, fresh, fresh, on_shard)
            for sid, b in again.items():  # a second failure is reported as it is
                self.summary.failed[sid] = "; ".join(b.values())
        return plan

    def duplicates(self, ex, plan: Plan, pending: list[Shard]) -> dict:
        """The corpus-wide duplicate-id pass: ids written anywhere in the folder, then `pending`
        in plan order. Its reading is fanned out on the executor; any failure fails the run."""
        ledger = read_ledger(self.run.plan_dir)
        done = [s for s in ledger.live if is_complete(self.run, s.id, self.sha)]
        outputs = {str(self.run.output_path(s.id)): s.id for s in done}
        written = []
        for path, h in ex.map_unordered(
            written_hashes,
            list(outputs),
            key=lambda p: f"ids-{os.path.basename(p)}-{self.token}",
            stop=self.stop,
        ):
            if isinstance(h, BaseException | str):
                why = h if isinstance(h, str) else f"{type(h).__name__}: {h}"
                raise RunStateError(
                    f"cannot read the ids of {path} ({why}), so duplicates "
                    "cannot be checked; if the file is damaged, delete it and rerun the same "
                    "command: its shard is done again"
                )
            written.append((outputs[path], h))
        written.sort()
        got = {}
        for shard, h in ex.map_unordered(
            pending_hashes,
            pending,
            key=lambda s: f"ids-{s.id}-{self.token}",
            stop=self.stop,
            cfg=self.job.input,
        ):
            if isinstance(h, BaseException):
                raise RunStateError(
                    f"cannot read the ids of shard {shard.id} ({shard.sources}): "
                    f"{type(h).__name__}: {h}"
                )
            got[shard.id] = h
        order = {s.id: i for i, s in enumerate(plan.ledger.live)}
        ordered = sorted(pending, key=lambda s: order.get(s.id, len(order)))
        return find_duplicates(written, [(s, got.get(s.id)) for s in ordered])

    def account(self, plan: Plan) -> None:
        """Totals from the records on disk, so they cover earlier (resumed) runs too."""
        self.summary.shards_total = len(plan.shards)
        records = self.run.records()
        self.summary.totals = Counts.total(
            records[s.id] for s in plan.shards if is_complete(self.run, s.id, self.sha)
        )

    def consistent(self) -> bool:
        """Before _SUCCESS: every shard of the folder is complete (not only this run's: a
        consumer waiting for _SUCCESS reads the whole folder), nothing withdrawn is left on disk
        (another array task may have been writing it), and no completed shard judged rows
        against a withdrawn one."""
        ledger = read_ledger(self.run.plan_dir)
        remove_withdrawn(self.run, ledger)
        if not all(is_complete(self.run, s.id, self.sha) for s in ledger.live):
            return False
        for rec in self.run.records().values():
            if any(d in ledger.retracted for d in rec.get("dup_of", ())):
                return False  # the next run re-judges it
        return True
