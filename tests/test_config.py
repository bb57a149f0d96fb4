import pytest

from fastserve.pipeline.config import JobConfig, load_job
from fastserve.pipeline.errors import ConfigError

BASE = {"input": {"paths": ["c/"]}, "model": {"path": "m"}, "output": {"path": "o"}}


def test_flags_build_a_typed_frozen_config():
    job = load_job(None, {**BASE, "task": {"batch_size": 8}})
    assert isinstance(job, JobConfig)
    assert (
        job.task.batch_size == 8 and job.input.paths == ("c/",) and job.input.text_column == "text"
    )
    with pytest.raises(AttributeError):
        job.task.batch_size = 3  # frozen


def test_job_file_then_flags_override(tmp_path):
    f = tmp_path / "job.toml"
    f.write_text(
        '[input]\npaths = ["corpus"]\ntext_column = "body"\n'
        '[model]\npath = "models/clf"\n[task]\nname = "sentiment"\nbatch_size = 4\n'
        '[output]\npath = "out"\n[cluster]\nworkers = 3\n'
    )
    job = load_job(f, {"task": {"batch_size": 16}})
    assert job.task.batch_size == 16  # the flag wins
    assert job.cluster.workers == 3 and job.input.text_column == "body"
    # relative paths in a job file are relative to the file, not to the working directory
    assert job.input.paths == (str(tmp_path / "corpus"),)
    assert job.model.path == str(tmp_path / "models/clf")


def test_unknown_key_names_the_key_and_lists_valid_ones(tmp_path):
    f = tmp_path / "job.toml"
    f.write_text("[task]\nbatchsize = 4\n")
    with pytest.raises(ConfigError) as e:
        load_job(f, BASE)
    assert (
        "task.batchsize" in str(e.value)
        and "task.batch_size" in str(e.value)
        and str(f) in str(e.value)
    )


def test_unknown_table(tmp_path):
    f = tmp_path / "job.toml"
    f.write_text("[inputs]\npaths = []\n")
    with pytest.raises(ConfigError, match="unknown key 'inputs'"):
        load_job(f, BASE)


@pytest.mark.parametrize(
    "table,value,match",
    [
        ({"task": {"batch_size": "big"}}, None, "task.batch_size' must be an integer"),
        ({"task": {"batch_size": True}}, None, "task.batch_size' must be an integer"),
        ({"output": {"overwrite": "yes"}}, None, "output.overwrite' must be true or false"),
        ({"input": {"keep_columns": 3}}, None, "input.keep_columns' must be a list of strings"),
        ({"task": {"batch_size": 0}}, None, "task.batch_size must be > 0"),
        ({"task": {"name": "summarise"}}, None, "task.name is 'summarise'"),
        ({"model": {"device": "tpu"}}, None, "model.device is 'tpu'"),
        ({"task": {"top_p": 0.0}}, None, "task.top_p must be in"),
        ({"task": {"temperature": 1}}, None, None),
        ({"task": {"pooling": "sum"}}, None, "task.pooling is 'sum'"),
        ({"task": {"stop": ["\n", 3]}}, None, "task.stop' must be a list of strings"),
    ],
)
def test_wrong_types_and_values_name_the_key(table, value, match):
    overrides = {**BASE, **{k: {**BASE.get(k, {}), **v} for k, v in table.items()}}
    if match is None:  # accepted (an integer where a float is asked is fine)
        load_job(None, overrides)
        return
    with pytest.raises(ConfigError, match=match):
        load_job(None, overrides)


def test_missing_required_settings():
    with pytest.raises(ConfigError, match="no model"):
        load_job(None, {"input": {"paths": ["c"]}, "output": {"path": "o"}})


def test_bad_toml(tmp_path):
    f = tmp_path / "job.toml"
    f.write_text("[task\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_job(f)


def test_an_empty_stop_string_is_refused():
    with pytest.raises(ConfigError, match="task.stop holds an empty string"):
        load_job(None, {**BASE, "task": {"name": "generate", "stop": ["\n\n", ""]}})


def test_options_added_since_0_2_leave_an_old_folders_identity_alone(tmp_path, classifier):
    """A sentiment folder made by 0.2.0 keeps its fingerprint: options added since then enter it
    only when set (their default gives the rows the folder already holds)."""
    from fastserve.pipeline.fingerprint import fingerprint

    job = load_job(None, {**BASE, "model": {"path": str(classifier)}})
    fields = fingerprint(job)["fields"]
    assert not {k for k in fields if k.split(".")[-1] in ("prompt_template", "chat", "system",
                "system_column", "json_schema", "json_schema_file", "regex", "choices",
                "reuse_prefix")}  # fmt: skip
    templated = load_job(None, {**BASE, "model": {"path": str(classifier)},
                                "task": {"name": "generate", "prompt_template": "{text}!"}})  # fmt: skip
    assert fingerprint(templated)["fields"]["task.prompt_template"] == "{text}!"
