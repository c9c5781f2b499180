"""Compare two artifacts of the same checkpoint, backend by backend: greedy tokens, logits, stored integers, bytes.

Used to check that a refactor of the exporters leaves their output as it was (`benchmarks/README.md`, "One decoder
for every exporter"): export the same checkpoint with the parent commit and with the change, then

    python benchmarks/compare_artifacts.py OLD_ARTIFACT NEW_ARTIFACT [--tokens 48] [--new-tokens 24]

For each backend both artifacts have, it prints: whether the greedy continuation of the held-out text's first
`--tokens` tokens is the same, the largest |logit difference| over those tokens teacher-forced, and which files are
byte-identical; for ONNX it also compares every integer initializer (the MatMulNBits / GatherBlockQuantized data) by
content. Exit status 1 when greedy tokens or integers differ.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np


def _greedy(backend, gather, ids: list[int], new: int) -> list[int]:
    backend.reset()
    logits = None
    for t, tok in enumerate(ids):
        tid = np.asarray([tok], np.int64)
        logits = backend.decode(np.asarray(backend.embed(tid), np.float32), gather(tid), np.asarray([t], np.int64))
    out = []
    for t in range(len(ids), len(ids) + new):
        tok = int(np.asarray(logits).reshape(-1).argmax())
        out.append(tok)
        tid = np.asarray([tok], np.int64)
        logits = backend.decode(np.asarray(backend.embed(tid), np.float32), gather(tid), np.asarray([t], np.int64))
    backend.reset()
    return out


def _onnx_integers(folder: Path) -> list[str]:
    """sha256 of every integer initializer of every graph, sorted (names may differ between the two exports)."""
    import onnx
    from onnx import numpy_helper

    digests = []
    for path in sorted(folder.glob("*.onnx")):
        model = onnx.load(str(path))
        for init in model.graph.initializer:
            arr = numpy_helper.to_array(init)
            if arr.dtype.kind in "iu":
                digests.append(hashlib.sha256(arr.tobytes()).hexdigest())
    return sorted(digests)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    from edge_gemma.artifact import Artifact
    from edge_gemma.export.fidelity import heldout_text, teacher_forced_logits
    from edge_gemma.ple import PleTable
    from edge_gemma.processor import Processor
    from edge_gemma.runtimes.registry import open_backend

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=24)
    args = ap.parse_args(argv)
    old, new = Artifact(args.old), Artifact(args.new)
    ids = Processor.from_dir(args.new / "tokenizer").tokenizer.encode(heldout_text(), add_bos=True)[: args.tokens]
    ok = True
    for name in sorted(set(old.backends) & set(new.backends)):
        results = {}
        for label, art in (("old", old), ("new", new)):
            ple = PleTable(art.root / art.manifest["ple"]["file"], art.manifest["ple"])
            with open_backend(art, name) as be:
                results[label] = (teacher_forced_logits(be, ple.gather, ids), _greedy(be, ple.gather, ids,
                                                                                         args.new_tokens))
            ple.close()
        diff = float(np.abs(results["old"][0] - results["new"][0]).max())
        same_tokens = results["old"][1] == results["new"][1]
        ok &= same_tokens
        files = {}
        for rel in sorted({f["path"] for f in new.manifest["files"] if f["path"].startswith(name + "/")}):
            o, n = args.old / rel, args.new / rel
            files[rel] = o.is_file() and _file_digest(o) == _file_digest(n)
        print(f"{name}: greedy tokens {'equal' if same_tokens else 'DIFFER'} ({args.new_tokens} after {len(ids)}), "
              f"max |logit diff| {diff:.3g} over {len(ids)} teacher-forced tokens")
        for rel, same in files.items():
            print(f"  {rel}: {'byte-identical' if same else 'differs'}")
        if name == "onnx":
            same_ints = _onnx_integers(args.old / "onnx") == _onnx_integers(args.new / "onnx")
            ok &= same_ints
            print(f"  integer initializers: {'identical' if same_ints else 'DIFFER'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
