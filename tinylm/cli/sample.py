"""sample.py's command line: load a model, then stream text from it (side by side for --num_samples)."""
import argparse
import dataclasses
import os
import sys
import traceback

import numpy as np

from tinylm.cli.common import OneLineParser, check_tokenizer_bin, parse_bool, run_cli
from tinylm.errors import TinyLMError
from tinylm.analysis.interventions import steer_generate, steering, steering_direction
from tinylm.core.sampling import NonFiniteLogits, check_sampling_args, sample_next
from tinylm.fast.arch import decoder
from tinylm.fast.parallel import blas_threads
from tinylm.io.hf import load_any
from tinylm.lowrank.compress import compress_on_the_fly, parse_rank
from tinylm.text.data import read_text

# The memory the samples drawn side by side may take; more samples than fit are drawn in groups (group_size).
SAMPLE_MEMORY = 256 << 20


def sample_parser():
    ap = OneLineParser(prog="sample.py", description="Sample text from a trained tinylm checkpoint.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out_dir", default="out", help="folder holding the checkpoint")
    ap.add_argument("--checkpoint", default="ckpt.npz",
                    help="checkpoint file inside OUT_DIR (best.npz: best validation loss), or a path to one")
    ap.add_argument("--init_from", default=None, metavar="PATH",
                    help="sample from this checkpoint file, GPT-2 or Llama folder in the Hugging Face layout "
                         "(config.json, model.safetensors, a tokenizer) or llama2.c model.bin instead of OUT_DIR")
    ap.add_argument("--tokenizer_bin", default=None, metavar="FILE",
                    help="with --init_from a llama2.c model.bin: its tokenizer.bin; without it, the tokenizer.bin beside model.bin")
    ap.add_argument("--start", default="\n", help="prompt text, or FILE:path to read it from a file (default: %(default)r)")
    ap.add_argument("--num_samples", type=int, default=3, help="number of samples to draw, side by side: the first "
                    "is shown as it is written, the others when it ends (so with one --seed the first of 3 is not "
                    "the one --num_samples 1 draws); more than fit in 256 MiB are drawn in groups of that many, one group after "
                    "another, from the same seeded generator")
    ap.add_argument("--max_new_tokens", type=int, default=500, help="tokens generated per sample")
    ap.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 picks the most likely token")
    ap.add_argument("--top_k", type=int, default=200, help="keep only the k most likely tokens (0 or less is refused)")
    ap.add_argument("--top_p", type=float, default=None, help="keep the smallest set of tokens with this much probability")
    ap.add_argument("--seed", type=int, default=1337, help="random seed")
    ap.add_argument("--no_cache", action="store_true", help="recompute the whole context every token (slow; for comparison)")
    ap.add_argument("--rank", default=None, help="first compress the model on the fly by plain truncated SVD to this rank: "
                    "a fraction of each block matrix's full rank (0.375) or an integer rank (32); see python -m tinylm.compress")
    ap.add_argument("--steer", default=None, metavar="DIRECTION",
                    help="add --steer_scale x this direction to the residual stream at the input of block --steer_layer, "
                    "at every position: 'case' (the mean of embedding[X] - embedding[x] over the letters: scale > 0 pushes towards "
                    "capitals) or a .npy file holding an n_embd vector; see tinylm/analysis/interventions.py: steer")
    ap.add_argument("--steer_layer", type=int, default=0, help="block whose input is steered (0 .. n_layer)")
    ap.add_argument("--steer_scale", type=float, default=1.0, help="multiple of the direction added (0: the plain model; "
                    "with the case direction 1 moves a lowercase letter onto its capital, on average)")
    ap.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return ap


def sample_main(argv=None):
    return run_cli(_sample, argv)


def _sample(argv):

    a = sample_parser().parse_args(argv)
    check_sampling_args(a.temperature, a.top_k, a.top_p)
    if a.num_samples < 1:
        raise TinyLMError(f"--num_samples must be >= 1, got {a.num_samples}")
    if a.max_new_tokens < 0:
        raise TinyLMError(f"--max_new_tokens must be >= 0, got {a.max_new_tokens}")
    if a.seed < 0:
        raise TinyLMError(f"--seed must be >= 0, got {a.seed}")
    if a.init_from:
        path = a.init_from
        if not os.path.exists(path):        # nanoGPT's --init_from gpt2 downloads; tinylm reads only what is on disk
            raise TinyLMError(f"--init_from {path} does not exist: give a checkpoint file, a GPT-2 or Llama folder in "
                              f"the Hugging Face layout, or a llama2.c model.bin (tinylm downloads nothing)")
    elif os.path.sep in a.checkpoint or os.path.exists(a.checkpoint) and \
            not os.path.exists(os.path.join(a.out_dir, a.checkpoint)):
        path = a.checkpoint
    else:
        path = os.path.join(a.out_dir, a.checkpoint)
    check_tokenizer_bin(a.tokenizer_bin, path, "--init_from")
    rank = None
    if a.rank is not None:
        rank = parse_rank(a.rank)
    ckpt = load_any(path, tokenizer_bin=a.tokenizer_bin)
    params, config, tok = ckpt["params"], ckpt["config"], ckpt["tokenizer"]
    if rank is not None:
        params, line = compress_on_the_fly(params, config, rank)
        print(line, file=sys.stderr)
    add = None           # a Llama steered past block 0: the vector added inside the forward (no parameter holds it)
    if a.steer is not None:
        direction, what = steering_direction(a.steer, params, config, tok)
        params, add = steering(params, config, direction, a.steer_layer, a.steer_scale)
        print(f"steering: {a.steer_scale:g} x {what} added to the residual stream at block {a.steer_layer}'s input"
              + (" (inside an uncached forward: slower)" if add else ""), file=sys.stderr)
    start = a.start
    if start.startswith("FILE:"):
        start = read_text(start[5:])
    if not start:
        raise TinyLMError("--start must not be empty")
    prompt = tok.encode(start)
    rng = np.random.default_rng(a.seed)
    pick = lambda logits: sample_next(logits, a.temperature, a.top_k, a.top_p, rng)
    group = group_size(config, a.num_samples, a.max_new_tokens, not a.no_cache,
                       next(iter(params.values())).dtype.itemsize)
    out = sys.stdout
    separator = "\n---------------\n"
    # one token at a time: tiny products, one BLAS thread is fastest. An overflow is caught as NonFiniteLogits,
    # so NumPy's warnings about it would only be noise.
    with blas_threads(1), np.errstate(over="ignore", invalid="ignore"):
        left = a.num_samples
        while left:
            rows = min(group, left)
            try:
                draw_group(params, config, prompt, rows, a, pick, tok, start, separator, out, add)
            except NonFiniteLogits as e:
                name, value = largest_weight(params)
                raise TinyLMError(f"{e} (the largest |weight| is {value:.3g}, in {name}); nothing more was "
                                  "sampled") from None
            left -= rows
    return 0


def group_size(config, num_samples, max_new_tokens, use_cache, itemsize):
    """How many samples are drawn side by side: all of them when they fit in SAMPLE_MEMORY bytes, else as many as
    fit (at least one), group after group. Per sample: its KV cache, a prefill's activations (attention scores
    H·T², the block's 12·T·C, the logits), and the tokens kept until the group's first sample has ended."""
    T, C, H, L, V = config.block_size, config.n_embd, config.n_head, config.n_layer, config.vocab_size
    numbers = H * T * T + 12 * T * C + V + (2 * L * T * C if use_cache else T * V)
    per_sample = itemsize * numbers + 8 * V + 4 * max_new_tokens
    return max(1, min(num_samples, SAMPLE_MEMORY // per_sample))


def draw_group(params, config, prompt, rows, a, pick, tok, start, separator, out, add=None):
    """rows samples side by side: the first written as it is drawn, the others when it ends. add: a steering vector
    by layer that the forward adds (interventions.steer_generate)."""
    if add:
        steps = steer_generate(params, config, prompt, rows, a.max_new_tokens, lambda z: [pick(r) for r in z], add)
    elif rows == 1:
        steps = ([token] for token in decoder(config).generate(params, config, prompt, a.max_new_tokens, pick,
                                                               use_cache=not a.no_cache))
    else:                    # side by side: a step's NumPy calls shared by every sample
        steps = decoder(config).generate_rows(params, config, prompt, rows, a.max_new_tokens,
                                              lambda logits: [pick(z) for z in logits], use_cache=not a.no_cache)
    others = np.empty((rows - 1, a.max_new_tokens), dtype=np.int32)     # 4 bytes a token, as group_size counts
    stream = TextStream(tok, out)
    for i, picked in enumerate(steps):
        if i == 0:
            out.write(start)             # once the first step has shown that the model's logits are finite
        stream.add(int(picked[0]))
        others[:, i] = picked[1:]
    if a.max_new_tokens == 0:
        out.write(start)
    stream.close()
    out.write(separator)
    for tokens in others:                # the others are complete at the same moment
        out.write(start + tok.decode(tokens) + separator)
    out.flush()


class TextStream:
    """A sample's text written as its tokens come. Only the tokens not yet written are decoded, so a long sample
    costs time in proportion to its length; a token whose text ends inside a multi-byte character (its
    decoding ends in U+FFFD) waits for the next one, up to four, a UTF-8 character's most bytes."""

    def __init__(self, tok, out):
        self.tok, self.out, self.pending = tok, out, []

    def add(self, token):
        self.pending.append(token)
        text = self.tok.decode(self.pending)
        if not text.endswith("\ufffd") or len(self.pending) >= 4:
            self.out.write(text)
            self.out.flush()
            self.pending = []

    def close(self):
        if self.pending:
            self.out.write(self.tok.decode(self.pending))
            self.pending = []


def largest_weight(params):
    """(name, value): the parameter holding the largest magnitude |w|, and that magnitude."""
    best = max(params, key=lambda k: float(np.max(np.abs(params[k]))) if np.size(params[k]) else 0.0)
    return best, float(np.max(np.abs(params[best])))

