"""`fastllm pretrain` and `fastllm generate` end to end, on a tiny model and a slice of the embedded corpus."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastllm.cli import COMMANDS, build_parser, main
from fastllm.train import TrainingDiverged

REPO = Path(__file__).parent.parent.parent
TINY = ["--max-bytes", "300000", "--vocab-size", "512", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
        "--block-size", "32", "--batch-size", "8", "--lr", "1e-2", "--min-lr", "1e-3", "--warmup-steps", "2",
        "--eval-interval", "4", "--eval-iters", "4", "--checkpoint-interval", "4", "--no-progress",
        "--sample-prompt", ""]


def records(out, kind):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One tiny pretraining run shared by the tests below: 8 steps, then --resume to 12."""
    out = tmp_path_factory.mktemp("pretrain")
    assert main(["pretrain", "--out", str(out), "--steps", "8", *TINY]) == 0
    return out


def test_pretrain_trains_and_writes_a_usable_run(run_dir):
    evals = records(run_dir, "eval")
    assert [r["step"] for r in evals] == [0, 4, 8]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5, evals  # ln(512) = 6.24 at the start
    assert [r["step"] for r in records(run_dir, "train")] == list(range(1, 9))
    for name in ("metrics.csv", "metrics.png", "data/meta.json", "data/tokenizer.json"):
        assert (run_dir / name).is_file(), name
    ckpt = run_dir / "checkpoints" / "step_00000008"
    assert (run_dir / "checkpoints" / "latest").read_text() == ckpt.name
    assert json.loads((ckpt / "config.json").read_text())["n_embd"] == 32
    assert (ckpt / "tokenizer.json").read_bytes() == (run_dir / "data" / "tokenizer.json").read_bytes()


def test_pretrain_resume_continues_the_run(run_dir, capsys):
    meta_mtime = (run_dir / "data" / "meta.json").stat().st_mtime_ns
    # --resume takes the model from the checkpoint: a different --n-embd on the command line is ignored.
    with pytest.warns(UserWarning, match=r"changed settings \{'steps': \(8, 12\)\}"):
        assert main(["pretrain", "--out", str(run_dir), "--steps", "12", "--resume", *TINY, "--n-embd", "64"]) == 0
    assert (run_dir / "data" / "meta.json").stat().st_mtime_ns == meta_mtime  # the prepared data was reused
    assert [r["step"] for r in records(run_dir, "train")] == list(range(1, 13))
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000012"
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 12 and summary["checkpoint"].endswith("step_00000012")


def test_generate_is_reproducible_and_runs_as_python_m(run_dir, capsys):
    argv = ["generate", "--ckpt", str(run_dir), "--prompt", "def ", "--prompt", "import", "--max-new-tokens", "8"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first  # same seed, same text
    assert first.startswith("def ") and "\nimport" in first and len(first) > len("def \nimport\n")
    proc = subprocess.run([sys.executable, "-m", "fastllm", *argv[:3], "--prompt", "class", "--temperature", "0",
                           "--max-new-tokens", "8"],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("class")


@pytest.mark.parametrize("argv, message", [
    (["generate", "--ckpt", "{tmp}/nowhere", "--prompt", "x"], "checkpoint path .*nowhere does not exist"),
    (["generate", "--ckpt", "{tmp}", "--prompt", "x"], "no checkpoint in"),
    (["pretrain", "--out", "{tmp}/run", "--batch-size", "0"], r"TrainConfig.batch_size must be an integer >= 1, got 0"),
    (["pretrain", "--out", "{tmp}/run", "--data", "{tmp}/missing.txt"], r"--data .*missing.txt: no such file"),
    (["pretrain", "--out", "{tmp}/run", "--resume", *TINY], r"resume=True but there is no checkpoint"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, argv, message):
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"fastllm {argv[0]}: error: ") and "Traceback" not in err
    assert __import__("re").search(message, err), err


def test_generate_rejects_a_corrupt_checkpoint(run_dir, tmp_path, capsys):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(run_dir / "checkpoints" / "step_00000008", ckpt)
    weights = bytearray((ckpt / "model.safetensors").read_bytes())
    weights[-1] ^= 0x01
    (ckpt / "model.safetensors").write_bytes(bytes(weights))
    assert main(["generate", "--ckpt", str(ckpt), "--prompt", "x"]) == 1
    assert "model.safetensors is corrupt" in capsys.readouterr().err


def test_commands_are_a_registry():
    assert {"pretrain", "generate"} <= set(COMMANDS)
    parser = build_parser({"generate": COMMANDS["generate"]})
    args = parser.parse_args(["generate", "--ckpt", "x", "--prompt", "a"])
    assert args.command == "generate" and args.prompt == ["a"] and args.max_new_tokens == 100
    with pytest.raises(SystemExit):
        parser.parse_args(["pretrain"])


def test_exit_codes_for_interrupt_divergence_and_bugs(monkeypatch, capsys):
    monkeypatch.setitem(COMMANDS, "fake", ("tiny", "a command that fails"))
    assert main(["fake", "--fail", "interrupt"]) == 130
    assert "interrupted after step 3; checkpoint saved to out/checkpoints/step_00000003" in capsys.readouterr().err
    assert main(["fake", "--fail", "diverge"]) == 1
    assert capsys.readouterr().err == "fastllm fake: error: loss is nan at step 4\n"
    with pytest.raises(AssertionError, match="a bug"):  # not a user error: the traceback is shown
        main(["fake", "--fail", "bug"])
    with pytest.raises(TrainingDiverged):  # --traceback shows it for user errors too
        main(["--traceback", "fake", "--fail", "diverge"])


def test_pretrain_on_an_already_prepared_dataset_folder(run_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(run_dir / "data"), "--out", str(out), "--steps", "2", *TINY]) == 0
    assert not (out / "data").exists()  # trained on the given folder, prepared nothing
    state = json.loads((out / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    assert state["state"]["run_info"] == {"stage": "pretrain", "data": str(run_dir / "data")}
