"""The caller's torch state around fastcurv's entry points (:mod:`fastcurv.ambient`): grad mode,
inference mode and autocast give the results of a clean call and are left as they were (anomaly
detection is left alone); data made under inference mode; gradient hooks on parameters in training; the
accelerator generators init_replicas seeds; radii in the default dtype."""
import warnings

import pytest
import torch
from torch import nn

import fastcurv
from fastcurv import ambient
from fastcurv.operator import HessianOperator
from fastcurv.replicas import ReplicaSet
from fastcurv.train import evaluate_population, train_population
from fastcurv import train_random

pytestmark = pytest.mark.usefixtures("one_thread")

GRAD_OFF = {"no_grad": torch.no_grad, "set_grad_enabled(False)": lambda: torch.set_grad_enabled(False),
            "inference_mode": torch.inference_mode}


def _mlps(R=3, dtype=torch.float32):
    out = []
    for r in range(R):
        torch.manual_seed(r)
        out.append(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype))
    return out


class _LNNet(nn.Module):  # LayerNorm: not fused, so backend "auto" takes torch.func
    def __init__(self):
        super().__init__()
        self.a, self.n, self.b = nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.n(self.a(x))))


def _data(n=20, dtype=torch.float32):
    g = torch.Generator().manual_seed(100)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def _builder():
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


TRAIN = dict(replicas=2, epochs=2, batch_size=8, lr=0.5, momentum=0.0, progress=False)


def _same_models(a, b) -> bool:
    return all(torch.equal(p, q) for ma, mb in zip(a, b) for p, q in zip(ma.parameters(), mb.parameters()))


def _state():
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cpu"),
            torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled())


# --- the context itself ----------------------------------------------------------------------------

def test_ambient_reset_sets_the_state_and_gives_the_callers_back():
    """Inside: grad on, inference mode and autocast off, anomaly detection as the caller set it (a
    process-wide setting, which other threads share); after: the caller's settings, also when the
    block raises, and nested."""
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16), \
            torch.autograd.set_detect_anomaly(True, check_nan=False):
        outside = _state()
        with ambient.ambient_reset():
            assert _state() == (True, False, False, True, False)
            with ambient.ambient_reset():
                assert _state() == (True, False, False, True, False)
            assert _state() == (True, False, False, True, False)
        assert _state() == outside == (False, True, True, True, False)
        with pytest.raises(KeyError), ambient.ambient_reset():
            raise KeyError
        assert _state() == outside
    assert not torch.is_anomaly_enabled()


def test_outside_inference_copies_inference_tensors_only():
    x = torch.ones(3)
    with torch.inference_mode():
        xi = torch.ones(3)
    assert ambient.outside_inference(x) is x
    with ambient.ambient_reset():
        y = ambient.outside_inference(xi)
    assert not y.is_inference() and torch.equal(y, xi)


# --- defect 1: training under no_grad ----------------------------------------------------------------

@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("ctx", list(GRAD_OFF))
def test_train_population_trains_under_the_callers_no_grad(ctx, fused):
    """Under torch.no_grad / set_grad_enabled(False) / inference_mode the fused path returned the
    models as initialized (the probe step read every parameter as unused; 1.37 away from the clean
    call's weights after 3 epochs, with a history of plausible losses), and the vmap path
    (fused=False) failed with torch's "element 0 of tensors does not require grad". Now the same
    models as a clean call, and the caller's grad mode is left as it was."""
    x, y = _data(16)
    ref, h_ref = train_population(_builder, x, y, fused=fused, **TRAIN)
    with GRAD_OFF[ctx]():
        before = _state()
        got, h = train_population(_builder, x, y, fused=fused, **TRAIN)
        assert _state() == before
    assert _same_models(got, ref) and h.train_loss == h_ref.train_loss and h.engine == h_ref.engine


# --- defect 2: autocast ------------------------------------------------------------------------------

def test_measures_under_autocast_are_the_clean_results():
    """Under torch.autocast("cpu", bfloat16) the fused engine's self-check failed (backend fused ->
    func, silently), epsilon_sharpness came out 2.25x off and rho_sharpness 22% off with ok=True,
    and lambda_max crashed in Lanczos ("Input dtypes must be the same": autocast turned fastcurv's
    own baddbmm to bfloat16). Now the clean results bit for bit, the backend too, for
    batched_sharpness and for a solver called on an operator built outside the region."""
    models, data = _mlps(), _data()
    meas = ("lambda_max", "trace", "rho_sharpness", "epsilon_sharpness")
    clean = fastcurv.batched_sharpness(models, data, measures=meas)
    op = HessianOperator(models, data)
    ref = fastcurv.lanczos(op, k=2, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fastcurv.batched_sharpness(models, data, measures=meas)
        eig = fastcurv.lanczos(op, k=2, seed=3)
        tr = fastcurv.hutchpp(op, num_matvecs=6, seed=1)
        assert torch.is_autocast_enabled("cpu")
    assert got.backend == clean.backend == "fused"
    for k in clean.values:
        assert torch.equal(got[k], clean[k]), k
    assert torch.equal(eig.eigenvalues, ref.eigenvalues)
    assert torch.equal(tr.trace, fastcurv.hutchpp(op, num_matvecs=6, seed=1).trace)


def test_training_and_evaluation_under_autocast_are_the_clean_results():
    """Inside a bfloat16 autocast region train_population's fused path failed with torch's "Expected out
    tensor to have dtype c10::BFloat16", and evaluate_population and function_measures ran the models
    in bfloat16 (loss 1.4e-4 and JS divergence 2.4e-3 off, relative). Now in the models' own dtype,
    the clean call's numbers bit for bit."""
    x, y = _data(16)
    ref, _ = train_population(_builder, x, y, **TRAIN)
    ev = evaluate_population(ref, x, y)
    fm = fastcurv.function_measures(ref, (x, y), measures=("soft", "weakness"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = train_population(_builder, x, y, **TRAIN)
        ev_got = evaluate_population(ref, x, y)
        fm_got = fastcurv.function_measures(ref, (x, y), measures=("soft", "weakness"))
    assert _same_models(got, ref)
    assert torch.equal(ev_got["loss"], ev["loss"])
    for k in fm.values:
        assert torch.equal(fm_got[k], fm[k]), k


# --- defect 3: gradient hooks on parameters in training ------------------------------------------------

def _masked_builder():
    m = _builder()
    mask = torch.ones_like(m[0].weight)
    mask[0] = 0  # unit 0's incoming weights kept fixed, in a torch.optim loop
    m[0].weight.register_hook(lambda g: g * mask)
    return m


@pytest.mark.parametrize("fused", [None, False])
def test_training_refuses_gradient_hooks_on_parameters(fused):
    """A gradient mask (``p.register_hook(lambda g: g * mask)``) keeps part of a weight fixed in a
    torch.optim loop; train_population ran no hook and moved the masked row (by 0.03 in one SGD
    epoch) on both engines, silently. Now a ValueError naming the parameter, as for module hooks;
    a post-accumulate-grad hook too."""
    x, y = _data(16)
    with pytest.raises(ValueError, match=r"parameter '0\.weight' has a gradient hook"):
        train_population(_masked_builder, x, y, fused=fused, **TRAIN)

    def post_hooked():
        m = _builder()
        m[2].bias.register_post_accumulate_grad_hook(lambda p: None)
        return m

    with pytest.raises(ValueError, match=r"parameter '2\.bias' has a post-accumulate-grad hook"):
        train_population(post_hooked, x, y, fused=fused, **TRAIN)
    # a template module: its deep copies had no hook to find, so the mask was ignored again
    with pytest.raises(ValueError, match=r"the template model's parameter '0\.weight' has a gradient hook"):
        train_population(_masked_builder(), x, y, fused=fused, **TRAIN)


def test_measures_ignore_gradient_hooks_on_parameters():
    """The measures differentiate copies of the parameters: a gradient hook (which changes what an
    optimizer sees, not the loss) does not change the curvature, on any backend."""
    data = _data()
    plain = _mlps(2)
    hooked = _mlps(2)
    for m in hooked:
        m[0].weight.register_hook(lambda g: g * 0)
    for backend in ("fused", "func", "autograd"):
        a = fastcurv.batched_sharpness(plain, data, measures=("lambda_max",), backend=backend)
        b = fastcurv.batched_sharpness(hooked, data, measures=("lambda_max",), backend=backend)
        assert torch.equal(a["lambda_max"], b["lambda_max"]), backend


# --- defect 4: accelerator generators ------------------------------------------------------------------

class _FakeCudaGenerators:
    """Two "CUDA devices" whose generators are numbers: ``torch.cuda``'s seeding and state functions
    replaced (no GPU here)."""

    def __init__(self, monkeypatch):
        self.seeds = {0: 1000, 1: 2000}
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
        monkeypatch.setattr(torch.cuda, "default_generators", tuple(self._Generator(self, d) for d in self.seeds),
                            raising=False)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get_rng_state)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_rng_state)

    class _Generator:
        def __init__(self, owner, device):
            self.owner, self.device = owner, device

        def manual_seed(self, s):
            self.owner.seeds[self.device] = int(s)

    def get_rng_state(self, device: int):  # (fork_rng passes device indices)
        return torch.tensor([self.seeds[device]])

    def set_rng_state(self, state, device: int):
        self.seeds[device] = int(state[0])


def test_init_replicas_restores_every_accelerator_generator(monkeypatch):
    """On a machine with CUDA, init_replicas seeded every CUDA device's generator (torch.manual_seed)
    inside a section that restored the CPU generator only: after train_population the caller's CUDA
    draws restarted from the last replica's seed ([11, 12, 13] seeded, never restored). Simulated:
    every generator it seeds is restored now, and the replicas still come from their seeds."""
    fake = _FakeCudaGenerators(monkeypatch)
    cpu = torch.get_rng_state()
    models = train_random.init_replicas(lambda: nn.Linear(3, 2), seeds=[11, 12, 13])
    assert fake.seeds == {0: 1000, 1: 2000}
    assert torch.equal(torch.get_rng_state(), cpu)
    torch.manual_seed(12)
    assert torch.equal(models[1].weight, nn.Linear(3, 2).weight)



def test_training_on_the_cpu_leaves_an_uninitialized_cuda_alone(monkeypatch):
    """Restoring every accelerator generator (above) read the CUDA generators, which initializes
    CUDA: a CUDA context for a CPU job, and at every dropout step a read of every GPU's state.
    Simulated: with CUDA available but not initialized, training with dropout on the CPU touches no
    CUDA generator."""
    def untouchable(*args, **kwargs):
        raise AssertionError("a CUDA generator was read or seeded")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    for name in ("get_rng_state", "set_rng_state", "manual_seed", "manual_seed_all"):
        monkeypatch.setattr(torch.cuda, name, untouchable)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    models, _ = train_population(lambda: nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Dropout(0.2), nn.Linear(5, 3)),
                                 x, y, replicas=2, epochs=2, batch_size=8, progress=False)
    assert len(models) == 2

# --- defect 5: measuring under no_grad -----------------------------------------------------------------

@pytest.mark.parametrize("ctx", list(GRAD_OFF))
def test_measures_under_the_callers_no_grad_are_the_clean_results(ctx):
    """Inside torch.no_grad / set_grad_enabled(False) / inference_mode (an eval loop, a
    ``@torch.no_grad()`` callback) a model the fused engine does not take (auto -> torch.func)
    failed with torch's "element 0 of tensors does not require grad", after a warning wrongly saying
    torch.func could not differentiate the model; a solver on an operator built outside and
    invariance_audit failed even for plain MLPs. Now the clean results, no warning."""
    torch.manual_seed(0)
    ln = [_LNNet() for _ in range(2)]
    mlps, data = _mlps(), _data()
    clean = fastcurv.batched_sharpness(ln, data, measures=("lambda_max", "rho_sharpness"))
    op = HessianOperator(mlps, data, backend="func")
    ref = fastcurv.power_iteration(op, max_iter=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with GRAD_OFF[ctx]():
            got = fastcurv.batched_sharpness(ln, data, measures=("lambda_max", "rho_sharpness"))
            eig = fastcurv.power_iteration(op, max_iter=10)
            audit = fastcurv.invariance_audit([nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
                                               for _ in range(2)], data, measures=("lambda_max",))
    assert got.backend == clean.backend == "func"
    for k in clean.values:
        assert torch.equal(got[k], clean[k]), k
    assert torch.equal(eig.eigenvalues, ref.eigenvalues)
    assert audit.table.loc["lambda_max", "invariant"] in (True, False)


# --- defect 6: inference tensors -----------------------------------------------------------------------

def test_inference_mode_data_and_calls_inside_inference_mode():
    """Data made under torch.inference_mode (preprocessed there): function_measures and
    evaluate_population failed with "the model cannot run on the first batch: Inference tensors do
    not track version counter" (the ReplicaSet's CSR cache read ``x._version``), and
    function_measures called inside inference_mode with torch's raw RuntimeError. Now the clean
    results."""
    models, (x, y) = _mlps(), _data()
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
    fm = fastcurv.function_measures(models, (x, y), measures=("disagreement", "weakness"))
    ev = evaluate_population(models, x, y)
    out = ReplicaSet(models).forward(x)
    with torch.inference_mode():
        fm_inside = fastcurv.function_measures(models, (x, y), measures=("disagreement", "weakness"))
    fm_data = fastcurv.function_measures(models, (xi, yi), measures=("disagreement", "weakness"))
    for k in fm.values:
        assert torch.equal(fm_inside[k], fm[k]) and torch.equal(fm_data[k], fm[k]), k
    assert torch.equal(evaluate_population(models, xi, yi)["loss"], ev["loss"])
    rs = ReplicaSet(models)
    assert torch.equal(rs.forward(xi), out) and torch.equal(rs.forward(xi), out)  # (the second: no stale cache)


def test_training_on_inference_mode_data():
    """train_population takes data made under inference mode (a copy of it), as clean data."""
    x, y = _data(16)
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
    for fused in (None, False):
        a, _ = train_population(_builder, x, y, fused=fused, eval_train=True, **TRAIN)
        b, _ = train_population(_builder, xi, yi, fused=fused, eval_train=True, **TRAIN)
        assert _same_models(a, b)


# --- defect 8: radii in the default dtype --------------------------------------------------------------

def test_josz_radius_and_perturbation_sigmas_do_not_take_the_default_dtype(monkeypatch):
    """josz_variation's radius was ``torch.full((R,), r)`` in the default dtype: a float64 model's
    josz_V moved with ``torch.set_default_dtype`` (1.5e-8 relative under float32, 1e-3 under
    bfloat16, where the radius 0.05 became 0.050048828125); function_measures' perturb_sigmas
    likewise (0.01 became 0.010009765625 under bfloat16). Now float64 whatever the default."""
    models, (x, y) = _mlps(2, torch.float64), _data(dtype=torch.float64)
    opts = {"josz_variation": {"n_iter": 3}}
    ref = fastcurv.batched_sharpness(models, (x, y), measures=("josz_variation",), measure_options=opts)["josz_V"]
    from fastcurv.function import weakness

    seen = []
    real = weakness.perturbation_agreement
    monkeypatch.setattr(weakness, "perturbation_agreement", lambda rs, probe, ref_, sigma, **kw: (
        seen.append(sigma.clone()), real(rs, probe, ref_, sigma, **kw))[1])
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        got = fastcurv.batched_sharpness(models, (x, y), measures=("josz_variation",), measure_options=opts)["josz_V"]
        fastcurv.function_measures(models, (x, y), measures=("perturbation_weakness",), perturb_sigmas=(0.01,),
                                   num_draws=1, bisect_steps=1, probe_size=8)
    finally:
        torch.set_default_dtype(old)
    assert torch.equal(got, ref)
    assert seen[0].dtype == torch.float64 and bool((seen[0] == 0.01).all())


# --- the operators ----------------------------------------------------------------------------------------
def test_operator_products_under_no_grad_and_autocast_are_the_clean_ones():
    """hvp with backend func or autograd inside torch.no_grad failed with torch's "element 0 of tensors
    does not require grad"; hvp and the GGN operator's products inside a bfloat16 autocast region came
    back bfloat16-accurate (5e-3 relative) as float32 tensors, silently."""
    models, data = _mlps(), _data()
    V = torch.randn(3, 53, generator=torch.Generator().manual_seed(0))
    ref = {b: fastcurv.hvp(models, data, V, backend=b) for b in ("func", "autograd")}
    ggn = fastcurv.GGNOperator(models, data)
    ggn_ref = ggn.matvec(V)
    with torch.no_grad():
        for b in ref:
            assert torch.equal(fastcurv.hvp(models, data, V, backend=b), ref[b])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for b in ref:
            assert torch.equal(fastcurv.hvp(models, data, V, backend=b), ref[b])
        assert torch.equal(ggn.matvec(V), ggn_ref)



def test_operators_take_inference_mode_data():
    """batched_sharpness with backend func or autograd, and invariance_audit, on data made under
    torch.inference_mode failed with "Inference tensors cannot be saved for backward"."""
    models, (x, y) = _mlps(), _data()
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
    for b in ("func", "autograd"):
        ref = fastcurv.batched_sharpness(models, (x, y), backend=b, measures=("lambda_max",))
        got = fastcurv.batched_sharpness(models, (xi, yi), backend=b, measures=("lambda_max",))
        assert torch.equal(got["lambda_max"], ref["lambda_max"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (Tanh: the transform is not function-preserving)
        fastcurv.invariance_audit(models, (xi, yi), measures=("lambda_max",))


def test_reparameterizations_under_autocast_check_the_function_as_outside():
    """rescale_layers' function check ran its probe passes under the caller's bfloat16 autocast: a
    relative output change of 4.8e-3 for 1.2e-7 clean, judged against bfloat16's loose tolerance.
    Now the same check as outside, for every transform."""
    models = []
    for r in range(2):
        torch.manual_seed(r)
        models.append(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)))  # (ReLU: rescaling preserves it)
    probe = _data()[0]
    clean = fastcurv.reparam.rescale_layers(models, alpha=10.0, probe=probe)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fastcurv.reparam.rescale_layers(models, alpha=10.0, probe=probe)
    assert got.relative_output_change == clean.relative_output_change < 1e-5
    assert all(torch.equal(p, q) for a, b in zip(got.models, clean.models) for p, q in zip(a.parameters(), b.parameters()))
