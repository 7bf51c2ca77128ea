"""auto's disk cache (RESLORA_AUTOTUNE_CACHE) is an optimisation: a broken, foreign or unwritable
file warns once and is ignored, never raising from the model's forward; concurrent writers, threads
or processes, keep every key."""

import json
import multiprocessing
import threading
import warnings

import pytest
import torch
from helpers import ToyStack

from reslora_kernels import backend
from reslora_kernels.autotune import AutoTuner, AutotuneCacheWarning, Choice


class FakeTimer:
    def __init__(self, **ms):
        self.ms, self.calls = ms, []

    def __call__(self, name, fn):
        self.calls.append(name)
        return self.ms[name]


@pytest.fixture
def tuned(monkeypatch, tmp_path):
    """CPU tensors take auto's timed path with a fresh tuner and a fake timer (fused faster),
    the cache at ``tmp_path / "autotune.json"`` unless the test points it elsewhere."""
    monkeypatch.setattr(backend, "TIMED_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setenv("RESLORA_AUTOTUNE_CACHE", str(tmp_path / "autotune.json"))

    def install():
        timer = FakeTimer(fused=1.0, composed=2.0)
        monkeypatch.setattr(backend, "TUNER", AutoTuner(timer=timer))
        return timer

    return install


def forward_twice():
    """Two training forwards of new shapes (two tuning keys: two reads, two writes)."""
    layer = ToyStack(1, 24, "none", dtype=torch.float32).blocks[0]
    for rows in (5, 40):
        layer(torch.randn(rows, 24, requires_grad=True)).sum().backward()


def context():
    return AutoTuner._context("cpu")


def valid_entry(backend_name="fused", K=24):
    return {
        "device": "cpu",
        "m_bucket": 8,
        "K": K,
        "N": 24,
        "rank": 4,
        "dtype": "float32",
        "flags": ["bias", "fwd+bwd"],
        "backend": backend_name,
        "timings_ms": {"fused": 1.0, "composed": 2.0},
        "failures": {},
        "source": "timed",
    }


BROKEN = {
    "empty": "",
    "truncated": '{"cpu|torch": [{"device": "cpu", "m_',
    "a list": "[]",
    "a number": "7",
    "entries not a list": '{"ctx": {"a": 1}}',
    "binary": b"\xff\xfe\x00garbage",
}


@pytest.mark.parametrize("content", BROKEN.values(), ids=BROKEN.keys())
def test_a_broken_file_warns_once_and_is_replaced(tuned, tmp_path, content):
    path = tmp_path / "autotune.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    timer = tuned()
    with pytest.warns(AutotuneCacheWarning) as caught:
        forward_twice()
    assert len([w for w in caught if w.category is AutotuneCacheWarning]) == 1
    assert str(path) in str(caught[0].message) and "ignored" in str(caught[0].message)
    assert timer.calls  # timed instead of read
    # The next write replaced the broken file with a valid cache holding both keys.
    entries = json.loads(path.read_text())[context()]
    assert len(entries) == 2 and {e["backend"] for e in entries} == {"fused"}


@pytest.mark.parametrize(
    "bad_entry",
    [
        valid_entry("xyz"),  # a backend this version does not know
        valid_entry("reference"),  # a backend auto never chooses
        {**valid_entry(), "K": None},
        {"backend": "fused"},
        "not an entry",
    ],
    ids=["unknown backend", "not a candidate", "bad key", "missing fields", "a string"],
)
def test_a_bad_entry_is_left_out_with_one_warning(tuned, tmp_path, bad_entry):
    path = tmp_path / "autotune.json"
    good = {**valid_entry("composed", K=99)}
    path.write_text(json.dumps({context(): [bad_entry, good], "another device|torch 0": [bad_entry]}))
    timer = tuned()
    with pytest.warns(AutotuneCacheWarning, match="malformed or names a backend not among") as caught:
        forward_twice()
    assert len([w for w in caught if w.category is AutotuneCacheWarning]) == 1
    assert timer.calls
    data = json.loads(path.read_text())
    kept = data[context()]
    assert bad_entry not in kept and good in kept and len(kept) == 3  # the good one and two new keys
    assert data["another device|torch 0"] == [bad_entry]  # other contexts are not this process's to edit


@pytest.mark.parametrize("where", ["parent is a file", "under a file", "a directory"])
def test_an_unusable_location_warns_once(tuned, tmp_path, monkeypatch, where):
    if where == "parent is a file":
        (tmp_path / "file").write_text("")
        path = tmp_path / "file" / "autotune.json"  # mkdir: FileExistsError
    elif where == "under a file":
        (tmp_path / "file").write_text("")
        path = tmp_path / "file" / "cache" / "autotune.json"  # mkdir: NotADirectoryError
    else:
        path = tmp_path / "dir.json"
        path.mkdir()  # reading: IsADirectoryError; writing: os.replace onto a directory
    monkeypatch.setenv("RESLORA_AUTOTUNE_CACHE", str(path))
    timer = tuned()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        forward_twice()
        forward_twice()
    cache_warnings = [w for w in caught if w.category is AutotuneCacheWarning]
    assert 1 <= len(cache_warnings) <= 2 and len({str(w.message) for w in cache_warnings}) == len(cache_warnings)
    assert all("ignored" in str(w.message) for w in cache_warnings)
    assert timer.calls.count("fused") == 2  # the two keys, timed once each, kept in memory
    assert not list(tmp_path.glob("**/.*autotune*")) and not list(tmp_path.glob("**/.dir.json*"))


def test_a_good_file_reads_without_a_warning(tuned, tmp_path):
    path = tmp_path / "autotune.json"
    with warnings.catch_warnings():
        warnings.simplefilter("error", AutotuneCacheWarning)
        tuned()
        forward_twice()
        timer = tuned()  # a new process: both keys from disk
        forward_twice()
    assert timer.calls == []
    assert len(json.loads(path.read_text())[context()]) == 2


# ---------------------------------------------------------------------------- concurrent writers
def choice(index: int) -> Choice:
    key = ("cpu", 8, 16 + index, 24, 4, "float32", ("fwd+bwd",))
    return Choice(key, "fused", {"fused": 1.0, "composed": 2.0})


def saved_keys(path):
    return sorted(entry["K"] - 16 for entry in json.loads(path.read_text())[context()])


def test_threads_writing_at_once_keep_every_key(tmp_path):
    path = tmp_path / "autotune.json"
    tuner = AutoTuner(cache_path=path)
    barrier = threading.Barrier(8)
    errors = []

    def write(index):
        try:
            barrier.wait()
            for k in range(3):
                tuner._save(choice(index * 3 + k))
        except Exception as err:  # noqa: BLE001  (the test reports every writer's failure)
            errors.append(err)

    with warnings.catch_warnings():
        warnings.simplefilter("error", AutotuneCacheWarning)
        threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    assert saved_keys(path) == list(range(24))
    assert [p.name for p in tmp_path.iterdir() if p.name != "autotune.json.lock"] == ["autotune.json"]


def _write_keys(path, first, count, barrier):
    warnings.simplefilter("error", AutotuneCacheWarning)
    tuner = AutoTuner(cache_path=path)
    barrier.wait()
    for index in range(first, first + count):
        tuner._save(choice(index))


def test_processes_writing_at_once_keep_every_key(tmp_path):
    path = tmp_path / "autotune.json"
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    barrier = ctx.Barrier(4)
    processes = [ctx.Process(target=_write_keys, args=(path, 5 * i, 5, barrier)) for i in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [p.exitcode for p in processes] == [0] * 4
    assert saved_keys(path) == list(range(20))
