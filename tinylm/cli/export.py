"""python -m tinylm.export CKPT FOLDER [--format llama2c]: a checkpoint as a Hugging Face GPT-2 or Llama folder,
or as llama2.c's model.bin and tokenizer.bin.

The work is in tinylm/io/hf.py (export_hf) and tinylm/io/llama2c.py (export_llama2c); this is only the command line.
"""
import argparse
import os
import sys

from tinylm.cli.common import OneLineParser, add_tokenizer_bin, check_tokenizer_bin, run_cli
from tinylm.errors import TinyLMError
from tinylm.io.hf import export_hf, load_any
from tinylm.io.llama2c import export_llama2c


def export_parser():
    ap = OneLineParser(prog="python -m tinylm.export",
                       description="Write a tinylm checkpoint as a GPT-2 or Llama folder in the Hugging Face "
                       "layout: config.json, model.safetensors and the tokenizer (GPT-2: vocab.json and merges.txt; "
                       "Llama: tokenizer.json; and tinylm_tokenizer.json for a character model). transformers' "
                       "GPT2LMHeadModel or LlamaForCausalLM.from_pretrained(FOLDER) loads it, and so do tinylm's "
                       "train.py and sample.py (--init_from FOLDER) and analyze.py.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("checkpoint", metavar="CKPT", help="a tinylm checkpoint (.npz), or a GPT-2 or Llama folder to re-export")
    ap.add_argument("folder", metavar="FOLDER", help="the folder to write (created if missing)")
    ap.add_argument("--format", choices=("hf", "llama2c"), default="hf",
                    help="hf: the Hugging Face folder above; llama2c: FOLDER/model.bin and FOLDER/tokenizer.bin "
                    "for llama2.c's run.c (a Llama; see docs/guide.md)")
    ap.add_argument("--dtype", choices=("float32", "float16", "float64"), default="float32",
                    help="dtype of the stored weights")
    add_tokenizer_bin(ap)
    ap.add_argument("--force", action="store_true",
                    help="write into a folder that is not empty, replacing the model and tokenizer files in it")
    ap.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return ap


def _export(argv):
    a = export_parser().parse_args(argv)
    check_tokenizer_bin(a.tokenizer_bin, a.checkpoint, "CKPT")
    if os.path.exists(a.folder):
        if not os.path.isdir(a.folder):
            raise TinyLMError(f"{a.folder} exists and is not a folder")
        if os.path.isdir(a.checkpoint) and os.path.samefile(a.checkpoint, a.folder):
            raise TinyLMError("the source and the target are the same folder")
        if os.listdir(a.folder) and not a.force:
            raise TinyLMError(f"{a.folder} is not empty; pass --force to write into it anyway")
    if a.format == "llama2c":
        if a.dtype != "float32":
            raise TinyLMError(f"--format llama2c writes float32, the only dtype run.c reads; leave out --dtype {a.dtype}")
        result = export_llama2c(load_any(a.checkpoint, tokenizer_bin=a.tokenizer_bin), a.folder)
        print(f"wrote {a.folder}: {', '.join(result['files'])} (run it with llama2.c: ./run {a.folder}/model.bin -z "
              f"{a.folder}/tokenizer.bin)")
        for note in result["notes"]:
            print(f"note: {note}")
        return 0
    result = export_hf(load_any(a.checkpoint, tokenizer_bin=a.tokenizer_bin), a.folder, dtype=a.dtype)
    print(f"wrote {a.folder}: {', '.join(result['files'])}")
    for note in result["notes"]:
        print(f"note: {note}")
    return 0


def main(argv=None):
    return run_cli(_export, argv)


if __name__ == "__main__":
    sys.exit(main())
