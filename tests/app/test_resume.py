"""Resume after a crash: a real ``prunekit run`` killed with SIGKILL and resumed finishes with the
weights, masks and ranks of an uninterrupted run; damaged or foreign checkpoints are refused.

The runs are killed from here, the way a crash or an OOM killer would end them: the test watches
the run's checkpoint folder (the step of ``state.npz``, a checkpoint write's temporary file) and
sends SIGKILL when it sees the point it wants. The run may get a little further before the
signal lands, so the tests read where it stopped from the checkpoint left on disk."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from prunekit.app import checkpoint as ckpt
from prunekit.algorithms import algorithm_class, algorithm_names, make_algorithm
from prunekit.contract.backend import get_backend
from prunekit.app.cli import main
from prunekit.errors import ConfigError
from prunekit.app.job import RunConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/<group>/<file>
# 256 MNIST images, batch 32: 8 steps an epoch; 1 dense + 2 pruning epochs = 24 steps;
# checkpoints after steps 3, 6, 8 (end of the dense phase, evaluated), 9, 12, ..., 24
TINY = ["--model", "mnist_cnn", "--dataset", "mnist", "--train-limit", "256", "--test-limit", "64",
        "--batch-size", "32", "--dense-epochs", "1", "--prune-epochs", "2", "--sparsity", "0.8",
        "--checkpoint-every", "3", "--deterministic", "--no-progress",
        # masks move every step over 0.6 of the phase (the algorithms' own frequency 100 would move them once)
        "--frequency", "1", "--end-fraction", "0.6"]


def _prunekit(args, out, resume=False, kill_when=None, timeout=300):
    """Run ``prunekit run`` in a subprocess. With ``kill_when(step, writing)``, watch its checkpoint
    folder meanwhile and SIGKILL it as soon as that holds: ``step`` is the step of the checkpoint
    in ``state.npz`` (asked once one exists), ``writing`` whether the run is writing the next one
    (its temporary file is there, not yet renamed over ``state.npz``)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "prunekit", "run", *args, "--out", str(out)] + (["--resume"] if resume else [])
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=stdout, stderr=stderr, text=True)
        deadline = time.monotonic() + timeout
        try:
            if kill_when is not None:
                _watch_and_kill(proc, str(out), kill_when, deadline)
            proc.wait(max(0.0, deadline - time.monotonic()))
        finally:
            if proc.poll() is None:  # timed out, or the test failed while watching
                proc.kill()
                proc.wait()
        stdout.seek(0)
        stderr.seek(0)
        done = subprocess.CompletedProcess(cmd, proc.returncode, stdout.read(), stderr.read())
    done.pid = proc.pid  # names the temporary files of its checkpoint writes
    return done


def _watch_and_kill(proc, out, kill_when, deadline, poll=0.001):
    folder, state = ckpt.checkpoint_dir(out), ckpt.checkpoint_path(out)
    partial = ckpt.temporary_name(ckpt.FILENAME, proc.pid)
    seen, step = None, None
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            st = os.stat(state)
        except FileNotFoundError:
            st = None
        if st is not None and (st.st_ino, st.st_mtime_ns) != seen:  # every write renames a new file in
            seen, step = (st.st_ino, st.st_mtime_ns), _step_on_disk(out)
        # looked at last, just before the signal, so that the write is most likely still going on
        writing = os.path.exists(os.path.join(folder, partial))
        if step is not None and kill_when(step, writing):
            proc.send_signal(signal.SIGKILL)
            return
        time.sleep(poll)


def _step_on_disk(out):
    return ckpt.read_checkpoint(ckpt.checkpoint_path(out))["position"]["step"]


def _finished(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _killed(proc, out):
    """The step of the checkpoint a killed run left."""
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])
    assert not os.path.exists(os.path.join(out, "weights.npz"))
    return _step_on_disk(str(out))


def _assert_same_run(a, b):
    """Final weights (BN statistics included), masks, ranks and trajectory identical."""
    wa, wb = np.load(os.path.join(a, "weights.npz")), np.load(os.path.join(b, "weights.npz"))
    assert sorted(wa.files) == sorted(wb.files)
    for k in wa.files:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
    pa, pb = np.load(os.path.join(a, "plan.npz")), np.load(os.path.join(b, "plan.npz"))
    assert sorted(pa.files) == sorted(pb.files)
    for k in pa.files:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
    ja, jb = json.load(open(os.path.join(a, "plan.json"))), json.load(open(os.path.join(b, "plan.json")))
    assert ja.get("ranks") == jb.get("ranks")
    ra, rb = json.load(open(os.path.join(a, "report.json"))), json.load(open(os.path.join(b, "report.json")))
    assert ra["trajectory"] == rb["trajectory"]
    assert ra["accuracy"] == rb["accuracy"]
    return ra, rb


@pytest.fixture(scope="module")
def torch_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "magnitude"
    _finished(_prunekit(["--backend", "torch", "--algorithm", "magnitude", *TINY], out))
    return out


def test_torch_magnitude_killed_twice_resumes_to_the_same_result(torch_reference, tmp_path):
    args = ["--backend", "torch", "--algorithm", "magnitude", *TINY]
    out = tmp_path / "run"
    # killed in the dense phase, as soon as its first checkpoint (after step 3) is there
    first = _killed(_prunekit(args, out, kill_when=lambda step, writing: True), out)
    # resumed, then killed in the pruning phase, the masks half-way down the schedule
    second = _killed(_prunekit(args, out, resume=True, kill_when=lambda step, writing: step >= 12), out)
    assert 3 <= first < second and 12 <= second < 24, (first, second)
    proc = _finished(_prunekit(args, out, resume=True))
    assert f"resuming from step {second}" in proc.stdout
    _, report = _assert_same_run(torch_reference, out)
    assert report["run"]["resumed_at_steps"] == [first, second]
    assert abs(report["totals"]["prunable_sparsity"] - 0.8) < 1e-4


def test_torch_rpg_killed_while_writing_a_checkpoint_resumes_from_the_last_good_one(tmp_path):
    args = ["--backend", "torch", "--algorithm", "rpg", *TINY]
    ref = tmp_path / "ref"
    _finished(_prunekit(args, ref))
    out = tmp_path / "run"
    # killed while writing a pruning-phase checkpoint (the one after step 12, unless the run is
    # quicker than the watcher), before its temporary file is renamed over state.npz
    proc = _prunekit(args, out, kill_when=lambda step, writing: step >= 9 and writing)
    last_good = _killed(proc, out)
    stale = {n for n in os.listdir(out / "checkpoint") if ckpt.is_temporary(n)}
    # the half-done write, never renamed into place (none if the write got done before the signal
    # landed: then state.npz is that new checkpoint, and the resume below must come out the same)
    assert stale <= {ckpt.temporary_name(ckpt.FILENAME, proc.pid), ckpt.temporary_name(ckpt.PREVIOUS, proc.pid)}
    state = ckpt.read_checkpoint(ckpt.checkpoint_path(str(out)))
    # RPG's state crosses the checkpoint: regrowth scores gathered for the next mask update, ranks
    assert last_good >= 9 and state["algorithm"]["dense_scores"] and state["algorithm"]["ranks"]
    _finished(_prunekit(args, out, resume=True))
    _, report = _assert_same_run(ref, out)
    assert report["ranks"] and report["run"]["resumed_at_steps"] == [last_good]
    assert sorted(os.listdir(out / "checkpoint")) == ["previous.npz", "state.npz"]  # the stale file is gone


def test_mindspore_magnitude_killed_resumes_to_the_same_result(tmp_path):
    args = ["--backend", "mindspore", "--algorithm", "magnitude", *TINY]
    ref = tmp_path / "ref"
    _finished(_prunekit(args, ref))
    out = tmp_path / "run"
    killed_at = _killed(_prunekit(args, out, kill_when=lambda step, writing: step >= 12), out)
    assert 12 <= killed_at < 24
    _finished(_prunekit(args, out, resume=True))
    _, report = _assert_same_run(ref, out)
    assert report["run"]["resumed_at_steps"] == [killed_at]


# ---------------------------------------------------------------------------- refusals
def _snapshot(folder):
    return {p: os.path.getmtime(os.path.join(r, p)) for r, _, files in os.walk(folder) for p in files}


def _resume_fails(out, extra, capsys, message):
    before = _snapshot(out)
    args = ["run", "--backend", "torch", "--algorithm", "magnitude", *TINY, "--out", str(out), "--resume", *extra]
    status = main(args)
    err = capsys.readouterr().err
    assert status == 2, err
    assert message in err, err
    assert _snapshot(out) == before  # no fresh start: nothing written or removed
    return err


@pytest.fixture
def copied_run(torch_reference, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(torch_reference, out)
    return out


def test_truncated_checkpoint_is_refused_naming_the_previous_one(copied_run, capsys):
    path = ckpt.checkpoint_path(str(copied_run))
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    err = _resume_fails(copied_run, [], capsys, "is damaged")
    assert "previous.npz" in err and "step 21" in err


def test_garbled_checkpoint_is_refused(copied_run, capsys):
    path = ckpt.checkpoint_path(str(copied_run))
    data = bytearray(open(path, "rb").read())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes((b + 1) % 256 for b in data[middle:middle + 64])
    open(path, "wb").write(bytes(data))
    _resume_fails(copied_run, [], capsys, "is damaged")


@pytest.mark.parametrize("extra, message", [
    (["--model", "resnet20"], "from another model: 'mnist_cnn', this run uses 'resnet20'"),
    (["--algorithm", "rpg"], "from another algorithm: 'magnitude', this run uses 'rpg'"),
    (["--sparsity", "0.5"], "another configuration (sparsity: 0.8 in the checkpoint, 0.5 now)"),
    (["--batch-size", "16"], "batch_size: 32 in the checkpoint, 16 now"),
])
def test_checkpoint_of_another_run_is_refused(copied_run, capsys, extra, message):
    _resume_fails(copied_run, extra, capsys, message)


def test_checkpoint_of_another_backend_is_refused(copied_run, capsys):
    _resume_fails(copied_run, ["--backend", "mindspore"], capsys, "from another backend: 'torch'")


def test_resume_without_checkpoint_is_an_error(tmp_path, capsys):
    out = tmp_path / "empty"
    status = main(["run", *TINY, "--out", str(out), "--resume"])
    assert status == 2 and "no checkpoint" in capsys.readouterr().err
    assert not out.exists()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: mnist_cnn\ndataset: mnist\nresume: true\nout: {out}\n")
    assert main(["run", "--recipe", str(recipe), "--no-progress"]) == 2
    assert "no checkpoint" in capsys.readouterr().err and not out.exists()


def test_checkpoint_every_is_checked():
    for bad in (-1, 2.5, True):
        with pytest.raises(ConfigError, match="checkpoint_every"):
            RunConfig(checkpoint_every=bad).validate()


# ---------------------------------------------------------------------------- the interface
def test_state_tree_round_trips_and_rejects_what_it_cannot_store(tmp_path):
    tree = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": [1, 2.5, None, True, "x"],
            "c": {"d": np.zeros(0, np.int64), "e": float("inf")}, "identity": {}, "position": {}, "model": {}}
    ckpt.save_checkpoint(str(tmp_path), tree)
    back = ckpt.read_checkpoint(ckpt.checkpoint_path(str(tmp_path)))
    np.testing.assert_array_equal(back["a"], tree["a"])
    assert back["a"].dtype == np.float32 and back["b"] == [1, 2.5, None, True, "x"]
    assert back["c"]["d"].dtype == np.int64 and back["c"]["e"] == float("inf")
    with pytest.raises(TypeError, match="key 3 is a int"):
        ckpt.flatten({"ranks": {3: 1}}, {})
    with pytest.raises(TypeError, match="a object cannot be saved"):
        ckpt.flatten({"x": object()}, {})


@pytest.mark.parametrize("backend_name, name, model", [("torch", n, "resnet20") for n in sorted(algorithm_names())]
                         + [("mindspore", "rpg", "mnist_cnn")])
def test_every_algorithm_state_dict_continues_a_run_exactly(backend_name, name, model, tmp_path):
    """In-process check of the contract in ``prunekit/algorithms/base.py``: stopping after k
    steps, saving through a checkpoint file and restoring into fresh objects continues exactly
    like the uninterrupted run (so a new algorithm that forgets some state fails here). MindSpore:
    RPG, whose rank machinery runs on the host there (NumPy state beside device tensors)."""
    if algorithm_class(name).prunes_at_init:
        pytest.skip(f"{name} decides at initialization (a resume re-makes that decision: the kill matrix below)")
    backend = get_backend(backend_name)
    rng = np.random.default_rng(0)
    steps, stop = 8, 4  # RPG: the regrowth scores of step 3 are used by the mask update of step 4
    channels, size = (1, 28) if model == "mnist_cnn" else (3, 32)  # ResNet-20 for BN (DSA); MNIST CNN: fast
    x = rng.normal(size=(steps, 16, channels, size, size)).astype(np.float32)
    y = rng.integers(0, 10, size=(steps, 16))
    cfg = RunConfig(backend=backend_name, model=model, algorithm=name, sparsity=0.6,
                    frequency=2, end_fraction=0.75)

    def held_out():  # endless held-out batches for bi-level algorithms (DSA)
        i = 0
        while True:
            yield x[i % steps][:8], y[i % steps][:8]
            i += 1

    def build():
        handle = backend.model_handle(model, 10, channels, size, seed=0)
        algorithm = make_algorithm(name, **cfg.algorithm_kwargs(steps))
        if algorithm.held_out_fraction:
            algorithm.validation = held_out()
        return handle, algorithm, backend.Trainer(handle, algorithm, "sgd", 0.05, total_steps=steps)

    def finish(handle, algorithm, trainer, start):
        for t in range(start, steps):
            trainer.train_step(x[t], y[t])
        trainer.finish()
        return handle.state_numpy(), algorithm.plan()

    state_a, plan_a = finish(*build(), 0)
    handle, algorithm, trainer = build()
    for t in range(stop):
        trainer.train_step(x[t], y[t])
    ckpt.save_checkpoint(str(tmp_path), {"identity": {}, "position": {}, "model": handle.state_numpy(),
                                         "algorithm": algorithm.state_dict(),
                                         "optimizer": backend.capture_training_state(trainer)})
    saved = ckpt.read_checkpoint(ckpt.checkpoint_path(str(tmp_path)))
    handle, algorithm, trainer = build()
    handle.load_state_numpy(saved["model"])
    algorithm.load_state_dict(saved["algorithm"])
    backend.restore_training_state(trainer, saved["optimizer"])
    state_b, plan_b = finish(handle, algorithm, trainer, stop)
    for k in state_a:
        np.testing.assert_array_equal(state_a[k], state_b[k], err_msg=f"{name}: {k}")
    assert sorted(plan_a.masks) == sorted(plan_b.masks)
    for k in plan_a.masks:
        np.testing.assert_array_equal(plan_a.masks[k], plan_b.masks[k], err_msg=f"{name}: mask {k}")
    assert plan_a.ranks == plan_b.ranks


# ---------------------------------------------------------------------------- every algorithm, both backends
# 64 MNIST images, batch 16, no dense phase, 1 pruning epoch: 4 steps (DSA: 3, a tenth held out),
# a checkpoint after each; the kill lands after the checkpoint of the step before the last, when
# every algorithm has made its decisions (DSA searches over the first third here). DSA needs
# BatchNorm (ResNet-20 on 28x28 grey images); the rest use the MNIST CNN. PreCropping scores
# with SNIP on one batch (SynFlow's 100 rounds cost more than the rest of the case).
MATRIX = ["--dataset", "mnist", "--train-limit", "64", "--test-limit", "32", "--batch-size", "16",
          "--dense-epochs", "0", "--prune-epochs", "1", "--sparsity", "0.5", "--checkpoint-every", "1",
          "--deterministic", "--no-progress", "--latency-batch", "0"]
MATRIX_MODEL = {"dsa": "resnet20"}
MATRIX_SETTINGS = {"dsa": ["--set", "end_fraction=0.34"], "precrop": ["--set", "score=snip", "--set", "batches=1"]}
SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run_forkserver.py")


class ForkServer:
    """Runs ``prunekit`` in children forked from one process that imported the backend once
    (``run_forkserver.py``); each child is a real process, SIGKILLed from here."""

    def __init__(self, backend):
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, SERVER, backend, "mnist,64,32"], cwd=ROOT, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout.readline().strip() == "ready"

    def run(self, argv, out, resume=False, kill_when=None, timeout=300):
        """``(exit status, output)`` of ``prunekit run argv --out out``; with ``kill_when(position,
        writing)``, SIGKILLed as soon as it holds for the checkpoint on disk."""
        log = f"{out}.log"
        argv = ["run", *argv, "--out", str(out)] + (["--resume"] if resume else [])
        self.proc.stdin.write(json.dumps({"argv": argv, "log": log}) + "\n")
        self.proc.stdin.flush()
        pid = int(self.proc.stdout.readline().split()[1])
        if kill_when is not None:
            _watch_and_kill_pid(pid, str(out), kill_when, time.monotonic() + timeout)
        status = int(self.proc.stdout.readline().split()[1])
        with open(log) as f:
            return status, f.read()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(30)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _watch_and_kill_pid(pid, out, kill_when, deadline, poll=0.001):
    folder, state = ckpt.checkpoint_dir(out), ckpt.checkpoint_path(out)
    partial = ckpt.temporary_name(ckpt.FILENAME, pid)
    seen, position = None, None
    while _alive(pid) and time.monotonic() < deadline:
        try:
            st = os.stat(state)
        except FileNotFoundError:
            st = None
        if st is not None and (st.st_ino, st.st_mtime_ns) != seen:
            seen, position = (st.st_ino, st.st_mtime_ns), ckpt.read_checkpoint(state)["position"]
        writing = os.path.exists(os.path.join(folder, partial))
        if position is not None and kill_when(position, writing):
            os.kill(pid, signal.SIGKILL)
            return
        time.sleep(poll)


@pytest.fixture(scope="module")
def fork_servers():
    servers = {}
    yield lambda b: servers[b] if b in servers else servers.setdefault(b, ForkServer(b))
    for s in servers.values():
        s.close()


def _after_last_decision(position, writing):
    return position["step"] >= position["total_steps"] - 1


def _in_the_final_writes(position, writing):
    return position["step"] >= position["total_steps"]


@pytest.mark.parametrize("backend", ["torch", "mindspore"])
@pytest.mark.parametrize("name", sorted(algorithm_names()))
def test_every_algorithm_killed_after_its_decisions_resumes_bitwise(fork_servers, backend, name, tmp_path):
    server = fork_servers(backend)
    args = ["--backend", backend, "--algorithm", name, "--model", MATRIX_MODEL.get(name, "mnist_cnn"), *MATRIX,
            *MATRIX_SETTINGS.get(name, [])]
    ref, out = tmp_path / "ref", tmp_path / "run"
    status, log = server.run(args, ref)
    assert status == 0, log[-3000:]
    # torch/channel: killed in the final window too (evaluation, report, plan and weights being written)
    kills = [_after_last_decision] + ([_in_the_final_writes] if (backend, name) == ("torch", "channel") else [])
    for kill_when in kills:
        status, log = server.run(args, out, resume=out.exists(), kill_when=kill_when)
        assert status == -signal.SIGKILL, (status, log[-3000:])
        assert not (out / "weights.npz").exists()
        state = ckpt.read_checkpoint(ckpt.checkpoint_path(str(out)))
        assert kill_when(state["position"], False)
        if name == "dsa":  # killed after the channel decision: it is in the checkpoint
            assert state["algorithm"]["dsa"]["final_counts"] is not None and state["algorithm"]["dsa"]["channel_keep"]
    status, log = server.run(args, out, resume=True)
    assert status == 0, log[-3000:]
    _assert_same_run(ref, out)
    assert json.load(open(out / "report.json"))["run"]["resumed_at_steps"]
