"""The training loop: setup, then for each step a batch, its loss and gradients, clipping and the optimizer
step; every --eval_interval steps the losses, a metrics line, best.npz and ckpt.npz; a sample at the end.

What differs between runs is chosen once, before the loop, as small pieces (`Pieces`), so that the loop
itself has no branch for it:

- the weights the optimizer steps: all of them, or with --lora_rank only the adapters (`weights_view`);
- the optimizer step: AdamW, or Muon for the block matrices and AdamW for the rest (`optimizer_step`);
- the loss and gradients: this process's threads, or under mpiexec this rank's rows summed over the
  ranks (`distributed.Ranks.loss_and_grads`);
- what runs at each evaluation after the metrics line (`on_evaluate`): with --track_spectra the
  spectrum logger the caller hands in (`SpectraTracker`; this package does not import the analysis).
"""
import dataclasses
import functools
import json
import os
import signal
import sys
import time

import numpy as np
from tqdm import tqdm

from tinylm.core.arch import model_of
from tinylm.core.optim import clip_factor, global_norm, learning_rate_at
from tinylm.core.sampling import sample_next
from tinylm.errors import TinyLMError
from tinylm.fast.arch import decoder, fast_model
from tinylm.fast.optim import adamw_step, muon_step
from tinylm.fast.parallel import blas_threads, map_threads
from tinylm.io.checkpoint import save_checkpoint
from tinylm.lowrank.adapters import adapter_grads_unmerged, adapter_params, merged_params
from tinylm.text.data import get_batch
from tinylm.train import distributed
from tinylm.train import finetune
from tinylm.train.args import TrainArgs, unused_flag_notes, validate_args
from tinylm.train.start import (lock_out_dir, prepare_out_dir, read_source_first, refuse_to_replace, setup,
                                start_logs, unlock)


def train(a, explicit=(), log=print, dist=None, tracker=None):
    """Train as the args say. Returns a summary dict. Raises TinyLMError on any problem the user can fix.

    Started by mpiexec, every process runs this loop as one rank of distributed.py (dist). tracker: the
    function --track_spectra calls at each evaluation, tinylm.analysis.tracking.log_spectra (train.py
    passes it); a run with --track_spectra and no tracker is refused."""
    if dist is None and distributed.launched_size() > 1:
        return distributed.run(functools.partial(train, tracker=tracker), a, explicit, log)
    validate_args(a)
    check_tracker(a, tracker)
    root = dist is None or dist.root        # under MPI only rank 0 reads, evaluates, logs and writes
    finetune.validate_finetune_args(a, explicit)
    if dist is not None and a.lora_rank:
        raise TinyLMError("--lora_rank is not supported under mpiexec: fine-tune adapters in one process "
                          "(python train.py ...); full fine-tuning (--init_from CKPT without --lora_rank) works")
    source = read_source_first(a, explicit, dist)       # a bad --init_from is refused before OUT_DIR is made
    lock = lock_out_dir(a.out_dir) if root else None     # first: a second trainer must not even clean the folder
    try:
        if root:
            prepare_out_dir(a.out_dir)
            refuse_to_replace(a)
        return run_training(a, explicit, log, dist, tracker, source)
    finally:
        unlock(lock)


def check_tracker(a, tracker):
    if a.track_spectra and tracker is None:
        raise TinyLMError("--track_spectra needs a spectrum logger, and the training loop imports none: call "
                          "train(..., tracker=tinylm.analysis.tracking.log_spectra), as train.py does")


def run_training(a, explicit, log, dist, tracker, source=None):
    """train()'s body, with the arguments validated, --init_from's model read (source) and OUT_DIR prepared and
    locked (by rank 0)."""
    run = Run.from_setup(dist.share(lambda a, e: setup(a, e, log, source), a, explicit) if dist
                         else setup(a, explicit, log, source))
    a, root = run.a, dist is None or dist.root
    check_tracker(a, tracker)          # again: a resumed run tracks spectra when its checkpoint's settings say so
    if root:
        start_logs(a, run.step, log)
    if a.init_from == "resume" and run.step >= a.max_iters:
        return nothing_to_do(run, log)
    if root:
        for note in unused_flag_notes(a, explicit):
            log(note)
    begin = ("resuming at step " + str(run.step) if run.step else
             "from scratch" if a.init_from == "scratch" else "fine-tuning " + a.init_from)
    log(f"tinylm: {sum(p.size for p in run.params.values()):,} parameters, vocab {run.config.vocab_size}, "
        f"{len(run.splits['train']):,} training tokens; {begin}")
    # floating-point warnings stay quiet: a non-finite loss or gradient is checked at each step
    with StopRequested() as stop, np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        pieces = choose_pieces(run, dist, stop, tracker)
        loop(run, pieces)
    return finish(run, pieces, log)


# ---------------------------------------------------------------------------------------------- the loop


def loop(run, pieces):
    """From the run's step to --max_iters: evaluate when due, then one training step, and again."""
    a, start = run.a, run.step
    bar = tqdm(total=a.max_iters, initial=start, unit="step", disable=not a.progress, dynamic_ncols=True,
               desc="train", file=sys.stderr)
    try:
        for step in range(start, a.max_iters + 1):
            is_eval = step % a.eval_interval == 0 or step == a.max_iters
            if is_eval and pieces.root and not (step == start and a.init_from == "resume"):  # (evaluated before it was saved)
                losses = evaluate(run, pieces, step)
                bar.write(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            if step == a.max_iters:
                break
            stop_if_asked(run, pieces, step)          # between steps, so the saved state is always whole
            t_step = time.perf_counter()
            loss = train_step(run, pieces, step, is_eval)
            run.step = step + 1
            show_progress(run, pieces, bar, loss, time.perf_counter() - t_step)
    finally:
        bar.close()


def train_step(run, pieces, step, is_eval):
    """A batch; its loss and gradients (under MPI, summed over the ranks); the optimizer step, clipping folded in."""
    a = run.a
    x, y = get_batch(run.splits["train"], run.config.block_size, a.batch_size, run.batch_rng)
    loss, grads = pieces.loss_and_grads(pieces.step_params(), x, y, is_eval)
    grads = pieces.to_trained(grads)
    norm = global_norm(grads)
    if not (np.isfinite(loss) and np.isfinite(norm)):
        raise TinyLMError(f"training diverged at step {step}: loss {loss}, gradient norm {norm}; {kept(run)}; "
                          f"try a lower --learning_rate")
    pieces.opt_step(step, grads, clip_factor(norm, a.grad_clip))
    return loss


def evaluate(run, pieces, step):
    """Both splits' losses; best.npz at the best validation loss yet; a metrics line; the hooks; ckpt.npz."""
    params = pieces.eval_params()
    losses = estimate_loss(params, run.config, run.splits, run.a, step)
    if not all(np.isfinite(v) for v in losses.values()):
        raise TinyLMError(f"training diverged at step {step}: evaluation loss {losses['train']} (train), "
                          f"{losses['val']} (val); {kept(run)}; try a lower --learning_rate")
    if run.best is None or losses["val"] < run.best:
        run.best = losses["val"]
        save(run, pieces, step, "best.npz")
    record = {"step": step, "train_loss": losses["train"], "val_loss": losses["val"],
              **{name: rate(step) for name, rate in pieces.rates.items()},
              "elapsed_s": round(run.elapsed(), 3), "tokens_per_s": round(run.tok_s, 1)}
    with open(run.path("metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    for hook in pieces.on_evaluate:
        hook(run, step, params)
    save(run, pieces, step)
    return losses


def save(run, pieces, step, name="ckpt.npz"):
    """OUT_DIR/ckpt.npz with the optimizer state (to resume), or best.npz without; never a state that is not finite."""
    bad = [k for k, p in pieces.trained.items() if not np.isfinite(p).all()]
    if bad:        # never replace a good checkpoint with a broken state
        raise TinyLMError(f"training diverged before step {step}: {bad[0]} is not finite; {kept(run)}; "
                          f"try a lower --learning_rate")
    meta = {"step": step, "best_val_loss": run.best, "train_args": dataclasses.asdict(run.a),
            "rng": {"batch": run.batch_rng.bit_generator.state, "dropout": run.dropout_rng.bit_generator.state},
            "elapsed_s": run.elapsed(), **(finetune.lora_meta(run.lora) if run.lora else {})}
    with_optimizer = name == "ckpt.npz"
    save_checkpoint(run.path(name), run.params, run.config, run.tokenizer, run.opt_state if with_optimizer else None,
                    meta, run.adapters)
    run.saved = run.saved or with_optimizer


def kept(run):
    """What a run stopped by an error can truly say of its checkpoint."""
    return f"{run.path('ckpt.npz')} keeps the last good state" if run.saved else "nothing was saved"


def stop_if_asked(run, pieces, step):
    """After Ctrl-C or SIGTERM (on any rank): save the whole state, then stop (exit status 130, or 143)."""
    signum = pieces.stop_signum()
    if signum is None:
        return
    if pieces.root:
        save(run, pieces, step)
    raise Interrupted(f"interrupted at step {step}; saved {run.path('ckpt.npz')}; "
                      f"continue with: python train.py --out_dir {run.a.out_dir} --init_from resume",
                      signum if signum != getattr(signal, "SIGINT", None) else None)


def show_progress(run, pieces, bar, loss, dt):
    """The progress bar one step on; every 10 steps its loss, learning rates and tokens/s (smoothed)."""
    tokens = run.a.batch_size * run.config.block_size
    run.tok_s = tokens / dt if run.tok_s == 0 else 0.9 * run.tok_s + 0.1 * tokens / dt
    bar.update(1)
    if run.step % 10 == 0 or run.step == run.a.max_iters:
        rates = {name: f"{rate(run.step - 1):.2e}" for name, rate in pieces.rates.items()}
        bar.set_postfix(loss=f"{loss:.4f}", **rates, tok_s=f"{run.tok_s:.0f}", refresh=False)


def finish(run, pieces, log):
    """The summary: a sample from the trained model (--sample_tokens), the closing line, --merge's merged.npz."""
    a, best = run.a, run.best
    summary = {"step": run.step, "best_val_loss": best, "elapsed_s": run.elapsed(), "checkpoint": run.path("ckpt.npz")}
    if a.sample_tokens:
        summary["sample"] = sample(run, pieces.eval_params())
        log(f"--- sample after {run.step} steps ---\n{summary['sample']}\n---")
    best_text = "n/a" if best is None else f"{best:.4f}"
    log(f"done: {run.step} steps in {summary['elapsed_s']:.1f}s, best val loss {best_text}; saved "
        f"{run.path('ckpt.npz')} and {run.path('best.npz')}")
    if a.merge and run.lora is not None:
        summary["merged"] = finetune.write_merged(run.path("best.npz"), run.path("merged.npz"), log)
    return summary


def nothing_to_do(run, log):
    """A resumed run already at --max_iters: say how to train on (and still --merge)."""
    log(f"nothing to do: the run in {run.a.out_dir} is at step {run.step}, which is --max_iters; to train on, "
        f"pass a larger --max_iters (and --lr_decay_iters, for the learning rate to keep decaying)")
    if run.a.merge and run.lora is not None:
        finetune.write_merged(run.path("best.npz"), run.path("merged.npz"), log)
    return {"step": run.step, "best_val_loss": run.best, "elapsed_s": 0.0, "checkpoint": run.path("ckpt.npz")}


def sample(run, params):
    """--sample_tokens tokens from a line break (or the first token), seeded: the same run prints the same text."""
    rng = np.random.default_rng(run.a.seed)
    try:
        prompt = run.tokenizer.encode("\n")
    except TinyLMError:        # a text without line breaks: start from its first token
        prompt = np.array([0])
    pick = lambda logits: sample_next(logits, temperature=0.8, top_k=200, rng=rng)
    with blas_threads(1):
        generate = decoder(run.config).generate
        return run.tokenizer.decode(list(generate(params, run.config, prompt, run.a.sample_tokens, pick)))


def estimate_loss(params, config, splits, a, step):
    """Mean loss over eval_iters batches of each split, without dropout; its own RNG, so training's is untouched.

    The batches are drawn first, in the order one loop would draw them; then each batch's forward runs whole on
    one of a thread per core (one BLAS thread each: small products), so every loss is the one a single thread
    gives, bit for bit, and the mean adds them in the same order."""
    forward = fast_model(config).forward
    batches = {}
    for name, ids in splits.items():
        rng = np.random.default_rng([a.seed, step, len(name)])
        batches[name] = [get_batch(ids, config.block_size, a.batch_size, rng) for _ in range(a.eval_iters)]
    losses = map_threads(lambda xy: forward(params, config, *xy, for_backward=False)[1],
                         [xy for name in splits for xy in batches[name]])
    return {name: float(np.mean(losses[i * a.eval_iters:(i + 1) * a.eval_iters])) for i, name in enumerate(splits)}


# ---------------------------------------------------------------------------------------------- the run's state


@dataclasses.dataclass
class Run:
    """One training run: its settings and model, and the state that moves from step to step (what ckpt.npz keeps)."""
    a: TrainArgs
    config: object               # GPTConfig or LlamaConfig (core/arch.py)
    tokenizer: object            # None off rank 0
    params: dict                 # the model's weights; with adapters, the frozen ones
    opt_state: dict
    splits: dict                 # {"train": token ids, "val": token ids}
    lora: dict                   # the adapters' settings, or None
    adapters: dict               # the adapters' A and B, or None
    step: int
    best: float                  # the best validation loss so far, or None
    batch_rng: np.random.Generator
    dropout_rng: np.random.Generator
    elapsed_before: float        # seconds of training before this process (a resumed run's)
    saved: bool                  # ckpt.npz holds a state of this run: written by it, or the one resumed
    t0: float = dataclasses.field(default_factory=time.perf_counter)
    tok_s: float = 0.0           # tokens/s, smoothed over steps

    @classmethod
    def from_setup(cls, built):
        a, config, tokenizer, params, opt_state, state, splits = built
        return cls(a, config, tokenizer, params, opt_state, splits, state.get("lora"), state.get("adapters"),
                   int(state["step"]), state["best_val_loss"], rng_from_state(state["batch_rng"]),
                   rng_from_state(state["dropout_rng"]), float(state["elapsed_s"]), saved=a.init_from == "resume")

    def elapsed(self):
        return self.elapsed_before + time.perf_counter() - self.t0

    def path(self, name):
        return os.path.join(self.a.out_dir, name)


def rng_from_state(bit_state):
    rng = np.random.default_rng()
    rng.bit_generator.state = bit_state
    return rng


# ---------------------------------------------------------------------------------------------- the pieces


@dataclasses.dataclass
class Pieces:
    """The parts of a step chosen once, before the loop."""
    root: bool               # this process evaluates, logs and writes (not the other ranks under MPI)
    trained: dict            # what the optimizer steps: the params, or with adapters the adapters
    step_params: callable    # () -> the weights a training step runs on
    eval_params: callable    # () -> the weights evaluation and sampling run on (adapters merged)
    to_trained: callable     # the model's gradients -> those of `trained`
    loss_and_grads: callable  # (params, x, y, is_eval) -> the whole batch's (loss, grads)
    stop_signum: callable    # () -> the signal that asked the run to stop (on any rank), or None
    rates: dict              # {"lr": step -> AdamW's learning rate, and with Muon "muon_lr": step -> its}
    opt_step: callable       # (step, grads, grad_scale) -> None: `trained` and the optimizer state updated in place
    on_evaluate: list        # hooks (run, step, params) called at each evaluation, after its metrics line


def choose_pieces(run, dist, stop, tracker):
    """The run's pieces: its weights view, optimizer, gradients (one process or the ranks') and evaluation hooks."""
    root = dist is None or dist.root
    view = weights_view(run)
    rates = schedules(run.a)
    opt_step = optimizer_step(run, view["trained"], rates)
    on_evaluate = []
    if run.a.track_spectra and root:
        spectra = SpectraTracker(tracker, run, view["trained"])
        opt_step = spectra.wrap(opt_step)
        on_evaluate.append(spectra)
    if dist is None:
        loss_and_grads = lambda params, x, y, is_eval: fast_model(run.config).loss_and_grads_parallel(
            params, run.config, x, y, train=True, rng=run.dropout_rng)
        stop_signum = lambda: stop.signum
    else:
        loss_and_grads = lambda params, x, y, is_eval: dist.loss_and_grads(
            params, run.config, x, y, run.dropout_rng, stop.signum, is_eval)
        stop_signum = lambda: dist.stop_signum
    return Pieces(root=root, **view, loss_and_grads=loss_and_grads, stop_signum=stop_signum, rates=rates,
                  opt_step=opt_step, on_evaluate=on_evaluate)


def weights_view(run):
    """What the optimizer steps, and the weights the model runs on: all of them; or with adapters (--lora_rank)
    only the adapters trained, a training step running them unmerged (the targets then get no dW, adapters.py),
    evaluation and sampling on the merged W + s·B A."""
    params, adapters, lora = run.params, run.adapters, run.lora
    if lora is None:
        return {"trained": params, "step_params": lambda: params, "eval_params": lambda: params,
                "to_trained": lambda grads: grads}
    return {"trained": adapters, "step_params": lambda: adapter_params(params, adapters, lora),
            "eval_params": lambda: adapter_step(merged_params, params, adapters, lora),
            "to_trained": lambda grads: adapter_grads_unmerged(grads, lora)}     # d(s·B) -> dB, and only the adapters


def adapter_step(fn, *args):
    """The adapters' thin products on one BLAS thread: at R = 16 a multi-threaded BLAS left its threads
    spinning after them, and the model's threaded step that follows ran about 1.8x slower."""
    with blas_threads(1):
        return fn(*args)


def schedules(a):
    """{"lr": step -> AdamW's learning rate} and with Muon {"muon_lr": step -> the block matrices'}: the same
    warmup and cosine, Muon's ending at the same fraction of its peak."""
    rates = {"lr": lambda s: learning_rate_at(s, a.learning_rate, a.min_lr, a.warmup_iters, a.lr_decay_iters)}
    if a.optimizer == "muon":
        muon_min = a.muon_lr * (a.min_lr / a.learning_rate if a.learning_rate else 0.1)
        rates["muon_lr"] = lambda s: learning_rate_at(s, a.muon_lr, muon_min, a.warmup_iters, a.lr_decay_iters)
    return rates


def optimizer_step(run, trained, rates):
    """(step, grads, grad_scale) -> None, updating `trained` in place: Muon on the block matrices and AdamW on the
    rest, or AdamW on all (adapters get no weight decay). grad_scale is the clipping factor, folded in."""
    a, opt_state, lr = run.a, run.opt_state, rates["lr"]
    if a.optimizer == "muon":
        muon_lr = rates["muon_lr"]
        return lambda step, grads, grad_scale: muon_step(
            trained, grads, opt_state, lr(step), muon_lr(step), a.muon_momentum, a.orthogonalize, a.ns_steps,
            a.beta1, a.beta2, weight_decay=a.weight_decay, grad_scale=grad_scale)
    weight_decay = a.weight_decay if run.lora is None else 0.0
    return lambda step, grads, grad_scale: adamw_step(
        trained, grads, opt_state, lr(step), a.beta1, a.beta2, weight_decay=weight_decay, grad_scale=grad_scale)


class SpectraTracker:
    """--track_spectra: at each evaluation log_spectra(params, config, step, OUT_DIR/spectra.jsonl, updates,
    optimizer), the function the caller handed in (tinylm.analysis.tracking.log_spectra), with `updates` the
    ΔW = W_before − W_after of each block matrix applied by the step just before the evaluation (None at the first)."""

    def __init__(self, log_spectra, run, trained):
        self.log_spectra, self.run, self.trained = log_spectra, run, trained
        self.update = None

    def wrap(self, opt_step):
        """opt_step, keeping the block matrices' ΔW when the next step is an evaluation's."""
        a, trained = self.run.a, self.trained

        def step_and_keep(step, grads, grad_scale):
            if (step + 1) % a.eval_interval and step + 1 != a.max_iters:
                self.update = None
                return opt_step(step, grads, grad_scale)
            is_block_matrix = model_of(self.run.config).is_block_matrix
            before = {k: p.copy() for k, p in trained.items() if is_block_matrix(k, p.shape)}
            opt_step(step, grads, grad_scale)
            self.update = {k: w - trained[k] for k, w in before.items()} or None
        return step_and_keep

    def __call__(self, run, step, params):
        with blas_threads(1):
            self.log_spectra(params, run.config, step, run.path("spectra.jsonl"), self.update, run.a.optimizer)


# ---------------------------------------------------------------------------------------------- signals


class StopRequested:
    """Turns the first Ctrl-C (or SIGTERM) into a flag checked between steps; a second one stops at once."""

    SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM") if hasattr(signal, n))

    def __init__(self):
        self.requested = False
        self.signum = None
        self.previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:       # not in the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum

    def __exit__(self, *exc):
        for sig, previous in self.previous.items():
            signal.signal(sig, previous)
        return False


class Interrupted(TinyLMError):
    """Training stopped by Ctrl-C after saving; exit status 130 (143 for SIGTERM). Printed without 'error:'."""
    exit_code = 130
    prefix = ""

    def __init__(self, message, signum=None):
        super().__init__(message)
        if signum is not None:
            self.exit_code = 128 + int(signum)
