"""The run folder against a model of it: Hypothesis applies random sequences of what a nightly
routine does to a corpus and a model (add, rewrite, break, fix and delete files; run over all of
them or a subset; kill the command with SIGKILL at a random moment; retrain the model;
--overwrite), and after each run checks the folder against a plain in-memory account of what it
must hold:

- every id is written at most once, and every written row comes from the version of its file
  that the folder last saw, scored by the model the folder is bound to;
- every row of every readable file a run named is written or rejected, once, with the right
  reason (a duplicate_id only when its id is in another row of the folder);
- rows in = rows written + rows rejected over the completion records; _SUCCESS iff the run said
  complete; a bad file is always reported, and only bad or vanished files are.

Runs go in process (serial executor: many small runs a second) except the killed ones, which
are the real `fastserve infer` command. `pytest --hypothesis-profile nightly` runs it longer.
"""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fastserve.pipeline.testing import WORDS
from fastserve.pipeline.testing.models import build_classifier

from conftest import start_cli

settings.register_profile(
    "ci",
    max_examples=15,
    stateful_step_count=30,  # about 450 steps
    derandomize=True,  # CI: the same sequences every time (the nightly profile explores)
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
settings.register_profile(
    "nightly",
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
settings.load_profile("ci")

IDS = [f"i{n}" for n in range(24)]  # a small pool: ids repeat within and across files
text = st.one_of(
    st.lists(st.sampled_from(WORDS), min_size=1, max_size=8).map(" ".join),
    st.sampled_from([None, "", "   "]),
)
row = st.tuples(st.one_of(st.sampled_from(IDS), st.none()), text)
rows = st.lists(row, min_size=1, max_size=10)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two versions of one model: the same architecture and size, other weights."""
    root = tmp_path_factory.mktemp("versions")
    return [build_classifier(root / f"v{v}", seed=v) for v in (0, 1)]


class Scorer:
    """The reference: each model version's probabilities for a text, computed here row by row."""

    def __init__(self, folders):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.models = [
            (
                AutoTokenizer.from_pretrained(f),
                AutoModelForSequenceClassification.from_pretrained(f).eval(),
            )
            for f in folders
        ]
        self.memo: dict = {}

    def probs(self, version: int, text: str) -> list[float]:
        import torch

        key = (version, text)
        if key not in self.memo:
            tok, model = self.models[version]
            with torch.inference_mode():
                logits = model(**tok(text, return_tensors="pt", truncation=True)).logits[0]
            self.memo[key] = logits.softmax(-1).tolist()
        return self.memo[key]


class RunFolderMachine(RuleBasedStateMachine):
    """Files on disk, the model, and what the folder must hold, side by side with the real thing."""

    def __init__(self):
        super().__init__()
        self.root = Path(self.tmp.mktemp("rf"))
        self.corpus = self.root / "corpus"
        self.corpus.mkdir()
        self.out = self.root / "out"
        self.model = self.root / "model"
        shutil.copytree(self.versions[0], self.model)
        self.model_version = 0
        self.bound: int | None = None  # the model version the folder is bound to
        self.version = 0  # every file version written gets a new number
        self.disk: dict[str, dict] = {}  # key -> {"v", "kind": good|notparquet|corrupt, "rows"}
        self.contents: dict[int, dict] = {}  # version -> what it was
        self.seen: dict[str, set[int]] = {}  # key -> versions the folder may hold rows of

    # -- files ------------------------------------------------------------------------------

    def _write(self, key: str, kind: str, content: list) -> None:
        self.version += 1
        v = self.version
        path = self.corpus / key
        if kind == "notparquet":
            path.write_text(f"id,text\nx{v},not parquet\n")
            content = []
        else:
            if kind == "corrupt":  # ids of its own: a file that fails is nobody's first occurrence
                content = [(f"c{v}-{n}", t or "x") for n, (_, t) in enumerate(content)]
            src = [f"{key}#{v}#{n}" for n in range(len(content))]
            table = pa.table(
                {
                    "id": pa.array([i for i, _ in content], pa.string()),
                    "text": pa.array([t for _, t in content], pa.string()),
                    "src": pa.array(src, pa.string()),
                }
            )
            tmp = path.with_name(f".{key}.tmp")  # written aside and renamed, as producers do
            pq.write_table(table, tmp)
            if kind == "corrupt":
                from test_nightly import corrupt_text_pages

                corrupt_text_pages(tmp)
            tmp.replace(path)
        self.disk[key] = {"v": v, "kind": kind, "rows": content}
        self.contents[v] = self.disk[key]

    @rule(n=st.integers(0, 5), content=rows)
    def add_or_rewrite_file(self, n, content):
        self._write(f"f{n}.parquet", "good", content)

    @precondition(lambda self: self.disk)
    @rule(data=st.data(), kind=st.sampled_from(["notparquet", "corrupt"]), content=rows)
    def break_file(self, data, kind, content):
        key = data.draw(st.sampled_from(sorted(self.disk)))
        self._write(key, kind, content)

    @precondition(lambda self: any(f["kind"] != "good" for f in self.disk.values()))
    @rule(data=st.data(), content=rows)
    def fix_file(self, data, content):
        key = data.draw(
            st.sampled_from(sorted(k for k, f in self.disk.items() if f["kind"] != "good"))
        )
        self._write(key, "good", content)

    @precondition(lambda self: self.disk)
    @rule(data=st.data())
    def delete_file(self, data):
        key = data.draw(st.sampled_from(sorted(self.disk)))
        (self.corpus / key).unlink()
        del self.disk[key]

    @rule()
    def retrain(self):
        self.model_version = 1 - self.model_version
        for f in Path(self.versions[self.model_version]).iterdir():
            shutil.copyfile(f, self.model / f.name)

    # -- runs -------------------------------------------------------------------------------

    def _named(self, data) -> list[str]:
        if data.draw(st.booleans(), label="all files"):
            return sorted(self.disk)
        return data.draw(st.lists(st.sampled_from(sorted(self.disk)), min_size=1, unique=True))

    def _inputs(self, named: list[str]) -> list[str]:
        return (
            [str(self.corpus)]
            if named == sorted(self.disk)
            else [str(self.corpus / k) for k in named]
        )

    @precondition(lambda self: self.disk)
    @rule(data=st.data(), overwrite=st.booleans())
    def run(self, data, overwrite):
        self._run(self._named(data), overwrite)

    @precondition(lambda self: self.disk)
    @rule()
    def nightly(self):  # the same command again, over the whole folder (the common case)
        self._run(sorted(self.disk), overwrite=False)

    @precondition(lambda self: self.disk)
    @rule(data=st.data())
    def todays_files(self, data):  # a rerun that names only some files
        self._run(
            data.draw(st.lists(st.sampled_from(sorted(self.disk)), min_size=1, unique=True)), False
        )

    def _run(self, named: list[str], overwrite: bool) -> None:
        from fastserve.pipeline.config import load_job
        from fastserve.pipeline.errors import RunStateError
        from fastserve.pipeline.executors import serial_executor
        from fastserve.pipeline.infer import run_infer

        self.counts["runs"] += 1
        job = load_job(
            None,
            {
                "input": {"paths": self._inputs(named), "keep_columns": ["src"], "shard_rows": 12},
                "model": {"path": str(self.model)},
                "task": {"name": "sentiment"},
                "output": {"path": str(self.out), "overwrite": overwrite},
                "cluster": {"executor": "serial"},
            },
        )
        holds = list(self.out.glob("part-*.parquet")) or list(
            self.out.glob("_manifest/shards/*.json")
        )
        other = self.bound is not None and self.bound != self.model_version
        refused = other and not overwrite and bool(holds)  # a folder with no result is taken over
        try:
            summary = run_infer(job, serial_executor)
        except RunStateError as e:
            assert refused, f"refused unexpectedly: {e}"
            assert "model:" in str(e)
            self.counts["refused"] += 1
            return self._run(named, overwrite=True)  # as the message says
        assert not refused, "a folder bound to another model took this run"
        if other:
            self.seen = {}  # started afresh
        self.bound = self.model_version
        for k in named:
            self.seen[k] = {self.disk[k]["v"]}
        self.check_run(named, summary)

    @precondition(lambda self: self.disk and self.bound in (None, self.model_version))
    @rule(data=st.data(), delay=st.floats(1.0, 6.0))
    def killed_run(self, data, delay):
        named = self._named(data)
        args = ["infer", "--task", "sentiment", "--model", self.model, "--output", self.out,
                "--executor", "serial", "--shard-rows", "12", "--keep-column", "src"]  # fmt: skip
        for i in self._inputs(named):
            args += ["--input", i]
        proc = start_cli(*args)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        self.counts["killed"] += 1
        if self.bound is None and (self.out / "_manifest" / "run.json").exists():
            self.bound = self.model_version
        for k in named:  # the old version, or the new one if planning got that far
            self.seen.setdefault(k, set()).add(self.disk[k]["v"])

    # -- what must hold ----------------------------------------------------------------------

    def check_run(self, named: list[str], summary) -> None:
        self.counts["checked"] += 1
        self.counts["failed runs"] += bool(summary.failed)
        self.counts["withdrawn"] += len(summary.notes)
        out = self.folder()
        # every row of every readable named file: written or rejected, once, for the right reason
        for key in named:
            f = self.disk[key]
            if f["kind"] != "good":
                continue
            for n, (rid, t) in enumerate(f["rows"]):
                src = f"{key}#{f['v']}#{n}"
                rej = out["rejected"].get((key, n))
                if src in out["by_src"]:
                    assert rej is None, f"{src} both written and rejected"
                    assert rid is not None and t is not None and t.strip()
                    continue
                assert rej is not None, f"row {src} is neither written nor rejected"
                reason = rej["reason"]
                if rid is None:
                    assert reason == "null_id", (src, reason)
                elif reason == "duplicate_id":
                    others = [r for r in out["ids"].get(rid, []) if r != ("row", key, n)]
                    assert others, f"{src}: rejected as a duplicate of an id nowhere else"
                else:
                    want = "null_text" if t is None else "empty_text" if not t.strip() else None
                    assert reason == want, (src, reason, t)
        bad = {k for k, f in self.disk.items() if f["kind"] != "good"}
        if bad & set(named):  # a bad file named is always reported
            assert not summary.ok and summary.failed
        vanished = set(self.seen) - set(self.disk)
        for what, why in summary.failed.items():  # and only bad or vanished files are
            assert any(k in why or k in what for k in bad | vanished), f"{what}: {why}"
        if not bad:  # (a vanished file of a pending shard is left out, not failed)
            assert summary.ok, summary.failed
        # _SUCCESS: this run's inputs done, and every shard of the folder
        from fastserve.pipeline.ledger import read_ledger
        from fastserve.pipeline.manifest import RunDir

        run = RunDir(self.out)
        records = run.records()
        whole = all(
            s.id in records and run.output_path(s.id).exists()
            for s in read_ledger(run.plan_dir).live
        )
        assert (summary.ok and whole) == (self.out / "_SUCCESS").exists()

    def folder(self) -> dict:
        """The folder as read back: written rows by id and source, rejected rows by (file, row)."""
        from fastserve.pipeline.ledger import read_ledger
        from fastserve.pipeline.manifest import RunDir

        run = RunDir(self.out)
        written = (
            pq.read_table(self.out).to_pylist() if list(self.out.glob("part-*.parquet")) else []
        )
        rej_dir = self.out / "_rejected"
        rejected_rows = (
            pq.read_table(rej_dir).to_pylist()
            if rej_dir.is_dir() and list(rej_dir.glob("*.parquet"))
            else []
        )
        ids: dict[str, list] = {}
        by_src = {}
        for r in written:
            assert r["id"] not in ids, f"id {r['id']} written twice"
            ids[r["id"]] = [("written", r["src"])]
            by_src[r["src"]] = r
            key, v, n = r["src"].split("#")
            v, n = int(v), int(n)
            assert v in self.seen.get(key, set()), (
                f"row {r['src']} is of a version the folder should not hold"
            )
            assert self.contents[v]["rows"][n][0] == r["id"]
            probs = self.scorer.probs(self.bound, self.contents[v]["rows"][n][1])
            got = [dict(r["probabilities"])[label] for label in ("neg", "neu", "pos")]
            assert got == pytest.approx(probs, abs=2e-4), "scored by another model"
        rejected = {}
        for r in rejected_rows:
            where = (Path(r["source_file"]).name, r["row_number"])
            assert where not in rejected, f"{where} rejected twice"
            rejected[where] = r
            if r["id"] is not None and r["reason"] != "duplicate_id":
                ids.setdefault(r["id"], []).append(("row", *where))
        live = {s.id for s in read_ledger(run.plan_dir).live}
        records = [rec for sid, rec in run.records().items() if sid in live]
        assert sum(r["rows_in"] for r in records) == len(written) + len(rejected_rows)
        assert sum(r["rows_out"] for r in records) == len(written)
        return {"written": written, "by_src": by_src, "rejected": rejected, "ids": ids}

    @invariant()
    def no_id_written_twice(self):
        self.counts["steps"] += 1
        if list(self.out.glob("part-*.parquet")):
            ids = pq.read_table(self.out, columns=["id"]).column(0).to_pylist()
            assert len(ids) == len(set(ids)), "an id is written twice"


def test_run_folder_against_its_model(models, tmp_path_factory):
    from collections import Counter

    RunFolderMachine.versions = models
    RunFolderMachine.tmp = tmp_path_factory
    RunFolderMachine.scorer = Scorer(models)
    RunFolderMachine.counts = counts = Counter()
    RunFolderMachine.TestCase().runTest()
    print(f"run folder model: {dict(counts)}")
    # the machine must have exercised what it is for, or it proves nothing
    assert counts["checked"] >= 30 and counts["killed"] >= 3 and counts["refused"] >= 1, counts
    assert counts["failed runs"] >= 1 and counts["withdrawn"] >= 1, counts
