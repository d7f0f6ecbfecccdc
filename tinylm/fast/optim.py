"""core/optim.py's AdamW and core/muon.py's Muon, on a thread per core.

The parameters are independent, so each step deals them to `workers` threads (default: one per core)
and runs core's own per-parameter update on each: the same numbers as core's single-threaded step,
to the bit (tests/test_optim.py, tests/test_muon_training.py).
"""
from tinylm.core.muon import muon_update
from tinylm.core.optim import adamw_constants, adamw_update, decays
from tinylm.fast.parallel import for_each_split, run_parallel, split_by_size, usable_cores


def adamw_step(params, grads, state, lr, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, workers=None,
               grad_scale=1.0):
    """core.optim.adamw_step with the parameters split into `workers` groups, one thread each."""
    state["t"] += 1
    constants = adamw_constants(state["t"], lr, beta1, beta2, eps, weight_decay, grad_scale)

    def update(names):
        for name in names:
            p = params[name]
            adamw_update(p, grads[name], state["m"][name], state["v"][name], decays(name, p), **constants)
    for_each_split(update, params, workers=workers)


def muon_step(params, grads, state, lr, muon_lr, momentum=0.95, method="eigh", ns_steps=5, beta1=0.9,
              beta2=0.99, weight_decay=0.1, grad_scale=1.0, workers=None):
    """core.muon.muon_step with AdamW's part threaded as above and the matrices dealt to a thread per core,
    balanced by the cost of a polar factor (≈ size × short side)."""
    adam = {k: params[k] for k in state["m"]}
    adamw_step(adam, grads, state, lr, beta1, beta2, weight_decay=weight_decay, grad_scale=grad_scale,
               workers=workers)       # advances state['t'] too
    names = list(state["momentum"])
    workers = workers or usable_cores()
    costs = [params[k].size * min(params[k].shape) for k in names]
    groups = split_by_size(names, costs, workers) if workers > 1 else [names]

    def update(group):
        for name in group:
            g = grads[name] * grad_scale if grad_scale != 1.0 else grads[name]
            muon_update(params[name], g, state["momentum"][name], muon_lr, momentum, method, ns_steps)
    run_parallel(update, [(g,) for g in groups if g])
