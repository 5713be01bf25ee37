"""Every algorithm in MindSpore's GRAPH_MODE, in the routes MindSpore users train with:
``Model.train`` with :class:`PruningTrainOneStepCell` + :class:`PruningCallback` (dataset sinking
on and off), a user's own ``@mindspore.jit`` train step with ``session.graph_update()``, and the
:class:`Pruner` apply/convert idiom with a MindIR export that reloads.

Checked on the weights, after every step: pruned entries exactly zero, the graph's mask
Parameters equal to the algorithm's masks, no momentum at pruned positions; and the final
weights against the eager functional loop (PyNative) run on the same batches. A tiny conv net
at 8x8 keeps each GRAPH_MODE compile to a second or two.
"""
import os

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
import mindspore.nn as nn  # noqa: E402
import mindspore.ops as msops  # noqa: E402
import mindspore.dataset as msds  # noqa: E402
from mindspore.train import Callback, Model  # noqa: E402

import prunekit.backends.mindspore as bm  # noqa: E402
from prunekit.algorithms import make_algorithm  # noqa: E402
from prunekit.errors import ConfigError  # noqa: E402

STEPS, BATCH, LR = 3, 8, 0.05
SETTINGS = {
    "magnitude": dict(sparsity=0.6, frequency=1, end_fraction=0.5),
    "rpg": dict(sparsity=0.6, frequency=1, end_fraction=0.5),
    "trp": dict(energy=0.8, lam=1e-3),
    "dsa": dict(budget=0.6, end_fraction=0.5),
    "sdprun": dict(c=0.5, mu=0.51, lr=LR),
    "precrop": dict(sparsity=0.6, structure="unstructured", score="snip", batches=1),
    "channel": dict(keep_ratio=0.6, at_fraction=0.4),
}


class TinyNet(nn.Cell):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, pad_mode="pad", padding=1, has_bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, pad_mode="pad", padding=1, has_bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.fc = nn.Dense(8, 4)

    def construct(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.fc(msops.mean(x, (2, 3)))


def _net():
    ms.set_seed(0)
    net = TinyNet()
    rng = np.random.default_rng(0)
    for p in net.trainable_params():
        p.set_data(ms.Tensor((0.3 * rng.standard_normal(p.shape)).astype(np.float32)))
    return net


def _batches(n=STEPS):
    rng = np.random.default_rng(1)
    return [(rng.standard_normal((BATCH, 3, 8, 8)).astype(np.float32), rng.integers(0, 4, BATCH).astype(np.int32))
            for _ in range(n)]


def _algorithm(name):
    algo = make_algorithm(name, **SETTINGS[name])
    if name == "dsa":
        held = _batches(2)
        algo.validation = (held[i % 2] for i in range(10 ** 6))
    return algo


def _prepared(name):
    """A handle over a fresh net and the algorithm to train it with (precrop scores first)."""
    handle = bm.MindSporeModelHandle(_net(), (3, 8, 8), "tiny")
    algo = _algorithm(name)
    if algo.prunes_at_init:
        handle = algo.prepare(handle, bm.BACKEND, _batches(1))
    return handle, algo.training_algorithm()


def _optimizer(net):
    return nn.SGD(net.trainable_params(), learning_rate=LR, momentum=0.9, weight_decay=1e-3)


def _check_step(session, optimizer):
    """Pruned entries exactly zero, no momentum there, the graph's masks = the algorithm's."""
    algo = session.algorithm
    graph = session._graph
    masks = {n: m.asnumpy() for n, m in algo.masks.items()}
    for n, p in zip(graph.layers, graph.masks):
        np.testing.assert_array_equal(p.asnumpy(), masks.get(n, np.ones(p.shape, np.float32)), err_msg=n)
    state = bm.driver.optimizer_state_by_layer(optimizer, {n: session.handle.weight(n) for n in masks})
    for n, m in masks.items():
        assert not np.any(session.handle.weight(n).asnumpy()[m == 0]), f"{n}: pruned weights not zero"
        assert state[n], f"{n}: no momentum found"
        for s in state[n]:
            assert not np.any(s.asnumpy()[m == 0]), f"{n}: momentum at pruned positions"


class _Check(Callback):
    def __init__(self, session, optimizer):
        super().__init__()
        self.session, self.optimizer, self.steps = session, optimizer, 0

    def on_train_step_end(self, run_context):
        _check_step(self.session, self.optimizer)
        self.steps += 1


def _functional(name, batches):
    """The reference: the eager functional loop of the driver contract, PyNative."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    handle, algo = _prepared(name)
    net = handle.model
    net.set_train(True)
    opt = _optimizer(net)
    session = bm.PruningSession(handle, algo, opt, STEPS)

    def loss_fn(x, y):
        return msops.cross_entropy(net(x), y)

    grad_fn = ms.value_and_grad(loss_fn, None, opt.parameters)
    for x, y in batches:
        session.before_step()
        _, grads = grad_fn(ms.Tensor(x), ms.Tensor(y))
        grads = session.transform_gradients(grads)
        if session.should_step():
            opt(grads)
        session.after_optimizer_step()
    session.finish()
    return handle, algo


def _dataset(batches):
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    return msds.NumpySlicesDataset({"image": x, "label": y}, shuffle=False).batch(BATCH)


@pytest.fixture
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture
def mode(request):
    ms.set_context(mode=ms.GRAPH_MODE if request.param == "graph" else ms.PYNATIVE_MODE)
    yield request.param
    ms.set_context(mode=ms.PYNATIVE_MODE)


def _same_weights(handle, reference, algo, ref_algo):
    for n, m in ref_algo.masks.items():
        np.testing.assert_array_equal(algo.masks[n].asnumpy(), m.asnumpy(), err_msg=n)
    mine, theirs = handle.state_numpy(), reference.state_numpy()
    for n in theirs:
        np.testing.assert_allclose(mine[n], theirs[n], rtol=0, atol=3e-5, err_msg=n)


@pytest.fixture
def compiles(monkeypatch):
    """The names of the graphs MindSpore compiles (its compile path, not a cache hit, calls
    ``_check_recompile``, the function that warns "compiled again")."""
    import mindspore.graph.api as graph_api

    names, original = [], graph_api._check_recompile

    def counting(*args, **kwargs):
        names.append(str(args[3]) if len(args) > 3 else "?")
        return original(*args, **kwargs)
    monkeypatch.setattr(graph_api, "_check_recompile", counting)
    return names


@pytest.mark.parametrize("name", list(SETTINGS))
def test_model_train_in_graph_mode_matches_the_functional_loop(name, graph_mode, compiles):
    _model_train_matches_the_functional_loop(name, compiles)


@pytest.mark.parametrize("name", ["magnitude", "rpg"])
def test_model_train_in_pynative_matches_the_functional_loop(name, compiles):
    assert ms.get_context("mode") == ms.PYNATIVE_MODE
    _model_train_matches_the_functional_loop(name, compiles)


def _model_train_matches_the_functional_loop(name, compiles):
    batches = _batches()
    handle, algo = _prepared(name)
    opt = _optimizer(handle.model)
    session = bm.PruningSession(handle, algo, opt, STEPS)
    train_net = bm.PruningTrainOneStepCell(nn.WithLossCell(handle.model, nn.CrossEntropyLoss()), opt, session)
    check = _Check(session, opt)
    # dataset_sink_mode=True: on CPU MindSpore trains unsunk; the callback refuses multi-step sinks
    Model(train_net).train(1, _dataset(batches), callbacks=[bm.PruningCallback(session), check],
                           dataset_sink_mode=name in ("magnitude", "rpg"))
    assert session.step == STEPS and check.steps == STEPS
    train_graphs = [n for n in compiles if "PruningTrainOneStepCell" in n or "fused.construct" in n]
    assert train_graphs and len(train_graphs) == len(set(train_graphs)), f"compiled again: {train_graphs}"
    if name in ("magnitude", "rpg", "precrop", "channel"):
        assert any(not np.all(m.asnumpy()) for m in algo.masks.values()), "nothing was pruned"
    reference, ref_algo = _functional(name, batches)
    _same_weights(handle, reference, algo, ref_algo)


@pytest.mark.parametrize("mode, name", [("graph", "magnitude"), ("graph", "rpg"), ("graph", "sdprun"),
                                        ("pynative", "magnitude"), ("pynative", "sdprun")], indirect=["mode"])
def test_users_jit_train_step_reads_current_masks(name, mode, monkeypatch):
    batches = _batches()
    handle, algo = _prepared(name)
    net = handle.model
    net.set_train(True)
    opt = _optimizer(net)
    session = bm.PruningSession(handle, algo, opt, STEPS)
    update = session.graph_update()

    def loss_fn(x, y):
        return msops.cross_entropy(net(x), y)

    grad_fn = ms.value_and_grad(loss_fn, None, opt.parameters)

    @ms.jit
    def train_step(x, y):
        loss, grads = grad_fn(x, y)
        return msops.depend(loss, update(grads))

    import mindspore.graph.api as graph_api  # its compile path (not a cache hit) calls _check_recompile

    compiles, original = [], graph_api._check_recompile
    monkeypatch.setattr(graph_api, "_check_recompile", lambda *a, **k: (compiles.append(1), original(*a, **k))[1])
    before, compiled_first = {}, None
    for x, y in batches:
        if compiled_first is None and session.step == 1:
            compiled_first = len(compiles)
        session.before_step()
        before = {n: m.asnumpy() for n, m in algo.masks.items()}
        assert ms.get_context("mode") == (ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
        train_step(ms.Tensor(x), ms.Tensor(y))
        session.after_optimizer_step()
        for n, m in before.items():  # the step used this step's masks, not the first compile's
            assert not np.any(handle.weight(n).asnumpy()[m == 0]), n
        _check_step(session, opt)
    assert len(compiles) == compiled_first, "a graph was compiled again after the first step"
    session.finish()
    reference, ref_algo = _functional(name, batches)
    _same_weights(handle, reference, algo, ref_algo)


def test_transform_gradients_inside_a_compiled_step_is_refused(graph_mode):
    handle, algo = _prepared("magnitude")
    net = handle.model
    opt = _optimizer(net)
    session = bm.PruningSession(handle, algo, opt, STEPS)

    def loss_fn(x, y):
        return msops.cross_entropy(net(x), y)

    grad_fn = ms.value_and_grad(loss_fn, None, opt.parameters)

    @ms.jit
    def train_step(x, y):
        loss, grads = grad_fn(x, y)
        return msops.depend(loss, opt(session.transform_gradients(grads)))

    x, y = _batches(1)[0]
    session.before_step()
    with pytest.raises(RuntimeError, match="graph_update"):
        train_step(ms.Tensor(x), ms.Tensor(y))


def test_model_with_its_own_train_cell_is_refused(graph_mode):
    handle, algo = _prepared("magnitude")
    opt = _optimizer(handle.model)
    session = bm.PruningSession(handle, algo, opt, STEPS)
    model = Model(handle.model, nn.CrossEntropyLoss(), opt)
    w0 = handle.weights_numpy()
    with pytest.raises(ConfigError, match="PruningTrainOneStepCell"):
        model.train(1, _dataset(_batches()), callbacks=[bm.PruningCallback(session)], dataset_sink_mode=False)
    for n, w in handle.weights_numpy().items():
        np.testing.assert_array_equal(w, w0[n])


@pytest.mark.parametrize("name", ["trp", "channel"])
def test_pruner_apply_train_convert_export(name, graph_mode, tmp_path):
    batches = _batches()
    settings = dict(SETTINGS[name], energy=0.3) if name == "trp" else SETTINGS[name]  # low ranks: a split pays
    pruner = bm.Pruner(name, STEPS, (3, 8, 8), "tiny", **settings)
    net = pruner.apply(_net())
    opt = _optimizer(net)
    Model(pruner.train_network(nn.CrossEntropyLoss(), opt)).train(
        1, _dataset(batches), callbacks=pruner.callbacks(), dataset_sink_mode=False)

    def convs(cell):
        return [c for _, c in cell.cells_and_names() if isinstance(c, nn.Conv2d)]

    n_convs = len(convs(net))
    x = ms.Tensor(batches[0][0])
    net.set_train(False)
    dense_out = net(x).asnumpy()
    pruned = pruner.convert(decompose_threshold=0.3)
    pruned.set_train(False)
    assert pruned is not net and len(convs(net)) == n_convs  # the trained network is left as it was

    if name == "channel":  # compacted: narrower convs computing what the masked network computes
        assert sum(c.out_channels for c in convs(pruned)) < sum(c.out_channels for c in convs(net))
        np.testing.assert_allclose(pruned(x).asnumpy(), dense_out, rtol=0, atol=1e-4)
    else:  # decomposed: the low-rank conv split in two
        assert len(convs(pruned)) > n_convs, "TRP's convert() split no conv"
    path = os.path.join(tmp_path, "pruned")
    ms.export(pruned, x, file_name=path, file_format="MINDIR")
    loaded = nn.GraphCell(ms.load(path + ".mindir"))
    np.testing.assert_allclose(loaded(x).asnumpy(), pruned(x).asnumpy(), rtol=1e-5, atol=1e-5)


def test_sdprun_optimizer_in_a_jit_step_matches_the_neutral_algorithm(graph_mode):
    """The SDPrun optimizer compiled inside a user's @jit step (GRAPH_MODE) against SDPrunPruner
    through the eager functional loop with plain SGD (PyNative): the same weights, zero rows."""
    from prunekit.backends.mindspore.optimizers import SDPrun

    batches = _batches()
    handle = bm.MindSporeModelHandle(_net(), (3, 8, 8), "tiny")
    net = handle.model
    net.set_train(True)
    settings = dict(SETTINGS["sdprun"], c=3.0)  # large enough to zero some rows in three steps
    opt = SDPrun.from_handle(handle, learning_rate=LR, c=settings["c"], mu=0.51)

    def loss_fn(x, y):
        return msops.cross_entropy(net(x), y)

    grad_fn = ms.value_and_grad(loss_fn, None, opt.parameters)

    @ms.jit
    def train_step(x, y):
        loss, grads = grad_fn(x, y)
        return msops.depend(loss, opt(grads))

    for x, y in batches:
        train_step(ms.Tensor(x), ms.Tensor(y))
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ref = bm.MindSporeModelHandle(_net(), (3, 8, 8), "tiny")
    ref.model.set_train(True)
    algo = make_algorithm("sdprun", **settings)
    sgd = nn.SGD(ref.model.trainable_params(), learning_rate=LR)
    session = bm.PruningSession(ref, algo, sgd, STEPS)
    grad_ref = ms.value_and_grad(lambda x, y: msops.cross_entropy(ref.model(x), y), None, sgd.parameters)
    for x, y in batches:
        session.before_step()
        _, grads = grad_ref(ms.Tensor(x), ms.Tensor(y))
        sgd(session.transform_gradients(grads))
        session.after_optimizer_step()
    mine, theirs = handle.state_numpy(), ref.state_numpy()
    for k in theirs:
        np.testing.assert_allclose(mine[k], theirs[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert opt.n == STEPS and opt.lam == pytest.approx(algo.lam, rel=1e-12)
    w = handle.weights_numpy()
    assert any(not np.any(v[r]) for v in w.values() if v.ndim > 1 for r in range(v.shape[0])), "no row thresholded"


def test_multi_step_dataset_sink_on_a_device_is_refused(monkeypatch):
    """On Ascend/GPU in GRAPH_MODE a sink runs sink_size steps per call: refused at the start
    (CPU never sinks, so the device is simulated here), sink_size=1 accepted."""
    from mindspore.train.callback import RunContext, _InternalCallbackParam

    import prunekit.backends.mindspore.integrations as integrations

    handle, algo = _prepared("magnitude")
    opt = _optimizer(handle.model)
    session = bm.PruningSession(handle, algo, opt, STEPS)
    cell = bm.PruningTrainOneStepCell(nn.WithLossCell(handle.model, nn.CrossEntropyLoss()), opt, session)
    settings = {"mode": ms.GRAPH_MODE, "device_target": "Ascend"}
    monkeypatch.setattr(integrations.ms, "get_context", lambda key: settings[key])
    callback = bm.PruningCallback(session)
    for size, refused in ((-1, True), (4, True), (1, False)):
        params = _InternalCallbackParam()
        params.train_network, params.dataset_sink_mode, params.sink_size = cell, True, size
        if refused:
            with pytest.raises(ConfigError, match="sink_size=1"):
                callback.on_train_begin(RunContext(params))
        else:
            callback.on_train_begin(RunContext(params))
    params.cur_step_num = 1
    callback.on_train_step_begin(RunContext(params))
    callback.on_train_step_end(RunContext(params))
    params.cur_step_num = 5  # four steps in one call
    with pytest.raises(ConfigError, match="sink_size=1"):
        callback.on_train_step_end(RunContext(params))


def test_a_python_gradient_transform_is_refused_at_set_up():
    """An algorithm whose transform_gradients changes the gradients in Python (neither additive
    terms nor read-only) cannot run inside a compiled step: refused when the step is built."""
    handle, algo = _prepared("magnitude")
    algo.transform_gradients = lambda step, grads: {n: g * 2.0 for n, g in grads.items()}
    session = bm.PruningSession(handle, algo, _optimizer(handle.model), STEPS)
    with pytest.raises(ConfigError, match="functional loop"):
        session.graph_update()
    assert session._graph is None
